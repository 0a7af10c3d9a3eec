"""Preprocessing throughput (tokens/s) on a generated Alpaca file, by tokenizer path and worker count.

Generates `--samples` Alpaca records (with input, some with history and a system prompt) from words
of the built-in corpus, deterministically, then runs `graphllm preprocess alpaca` over them with
`--workers` 1 and 2 for two tokenizer paths:

- `spm+alpaca`: the built-in sentencepiece tokenizer and the built-in Alpaca template (one encode
  call per message);
- `hf+chat`: a byte-level BPE Hugging Face tokenizer with a chat template (trained here on the
  generated text, vocab `--hf-vocab`), masks from prefix renderings (1 + 2 x assistant-turns
  renders and encodes per sample).

The contenders run interleaved round-robin for `--rounds` rounds; printed per contender: median
tokens/s (tokens written / wall time of the whole run, tokenizer loading and worker start included),
median wall time, and the speedup of 2 workers over 1 (ratio of medians). Also checks that workers
1 and 2 wrote byte-identical files. The machines are small and shared: compare ratios, not absolute
numbers across runs.

    python benchmarks/preprocess.py --samples 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import interleave, median

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                 "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def generate(path: Path, n: int, seed: int = 0) -> None:
    from graphllm.data.corpus import builtin_documents

    words = [w for doc in builtin_documents()[:200] for w in doc.split() if w.isalpha()]
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": text(5, 30), "input": text(0, 40) if i % 2 else "", "output": text(20, 120)}
            if i % 5 == 0:
                rec["history"] = [[text(5, 20), text(10, 40)]]
            if i % 7 == 0:
                rec["system"] = text(5, 15)
            f.write(json.dumps(rec) + "\n")


def hf_tokenizer(path: Path, data: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = data.read_text(encoding="utf-8").splitlines()
    bpe.train_from_iterator((v for line in lines for v in json.loads(line).values() if isinstance(v, str)), trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf-vocab", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from graphllm.data.sft import ChatDataConfig, preprocess_chat
    from graphllm.data.tokenizer import builtin_tokenizer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "alpaca.jsonl"
        generate(data, args.samples)
        tokenizers = {"spm+alpaca": str(builtin_tokenizer().path), "hf+chat": str(hf_tokenizer(tmp / "hf", data, args.hf_vocab))}
        contenders = {f"{t} w{w}": (t, w) for t in tokenizers for w in args.workers}
        rates: dict[str, list[float]] = {c: [] for c in contenders}
        walls: dict[str, list[float]] = {c: [] for c in contenders}
        tokens: dict[str, tuple[int, int]] = {}
        print(f"{args.samples} Alpaca samples, {data.stat().st_size / 2**20:.1f} MiB; rounds: {args.rounds}")
        for order in interleave(list(contenders), args.rounds):
            for name in order:
                tok, workers = contenders[name]
                t0 = time.perf_counter()
                s = preprocess_chat(ChatDataConfig(kind="alpaca", inputs=[data], tokenizer=tokenizers[tok],
                                                   out=tmp / name.replace(" ", "_"), workers=workers))
                wall = time.perf_counter() - t0
                rates[name].append(s.tokens / wall)
                walls[name].append(wall)
                tokens[name] = (s.tokens, s.trained_tokens)
        print(f"{'contender':<16} {'tokens':>10} {'trained':>10} {'median tok/s':>13} {'median wall':>12}")
        for name in contenders:
            print(f"{name:<16} {tokens[name][0]:>10,} {tokens[name][1]:>10,} {median(rates[name]):>13,.0f} "
                  f"{median(walls[name]):>11.2f}s")
        for tok in tokenizers:
            base = f"{tok} w{args.workers[0]}"
            for w in args.workers[1:]:
                other = f"{tok} w{w}"
                same = all((tmp / f"{base.replace(' ', '_')}{suffix}").read_bytes()
                           == (tmp / f"{other.replace(' ', '_')}{suffix}").read_bytes()
                           for suffix in ("_input_ids_document.bin", "_labels_document.bin", "_meta.json"))
                print(f"{tok}: workers {w} vs {args.workers[0]}: speedup {median(rates[other]) / median(rates[base]):.2f}x, "
                      f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
