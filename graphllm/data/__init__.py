"""The built-in training data: stdlib prose corpus, a sentencepiece BPE tokenizer, token batches.

Everything is built locally (no downloads), deterministically, once, and cached under
`$GRAPHLLM_CACHE` (default `~/.cache/graphllm`) with atomic writes.
"""

from graphllm.data.batches import (
           BatchSpec,
           TokenBatches,
           builtin_token_ids,
           corpus_token_ids,
           encode_documents,
)
from graphllm.data.cache import atomic_write, cache_dir
from graphllm.data.corpus import builtin_documents
from graphllm.data.indexed import DTYPE_CODES, IndexedReader, IndexedWriter, best_dtype
from graphllm.data.tokenizer import Tokenizer, builtin_tokenizer, load_tokenizer

__all__ = ["DTYPE_CODES", "BatchSpec", "IndexedReader", "IndexedWriter", "TokenBatches", "Tokenizer", "atomic_write",
           "best_dtype", "builtin_documents", "builtin_token_ids", "builtin_tokenizer", "cache_dir", "corpus_token_ids",
           "encode_documents", "load_tokenizer"]
