"""Generation on static graphs: greedy ids equal transformers' generate, one decode graph for every
token, EOS/stop strings, and the generate/chat commands on a tiny HF checkpoint with a chat template."""

from __future__ import annotations

import io
import re
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.models import load_model
from hf_parity import hf_model, save_hf_checkpoint

from graphllm.errors import GraphllmError
from graphllm.generate import (
    SamplingConfig,
    StaticGenerator,
    generate_text,
    generate_until,
)

PROMPTS = [[5, 17, 33, 2, 9, 100, 3], [7, 8], list(range(40, 58))]  # 7, 2 and 18 tokens: one 32-token bucket
MORE_PROMPTS = [list(range(60, 80)), [11, 12, 13, 14, 15]]  # same bucket, fewer rows than the batch
NEW = 12
MAX_LEN = 64
PAD = 0
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_greedy(hf, prompts: list[list[int]], n: int, eos: int | None = None) -> list[list[int]]:
    """transformers' batched greedy generate (left-padded, with an attention mask); EOS and what
    follows it dropped."""
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    hf.generation_config.pad_token_id = PAD
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos)
    rows = out[:, S:].tolist()
    return [r[: r.index(eos)] if eos is not None and eos in r else r for r in rows]


def ours(gen: StaticGenerator, prompts, n: int, **kw) -> list[list[int]]:
    """Token ids per prompt, EOS excluded."""
    eos = set(kw.get("eos_ids", ()))
    rows: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for step in gen.run(prompts, max_new_tokens=n, **kw):
        for b, tok in enumerate(step):
            if tok is None or ended[b]:
                continue
            if tok in eos:
                ended[b] = True
            else:
                rows[b].append(tok)
    return rows


def _pair(family: str, tmp_path: Path):
    hf = hf_model(family, "sdpa").eval()
    model = load_model(save_hf_checkpoint(hf, family, tmp_path / family))
    return hf, model


@pytest.fixture(scope="module")
def generators(tmp_path_factory) -> dict:
    """Per family: the HF model, ours, and one eager generator (batch 3) shared by the tests, so each
    graph compiles once per module."""
    out = {}
    for family in ("llama", "qwen2-tied"):
        hf, model = _pair(family, tmp_path_factory.mktemp("gen"))
        out[family] = (hf, model, StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="eager"))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_greedy_ids_equal_transformers_and_decode_compiles_once(family: str, generators: dict) -> None:
    hf, model, gen = generators[family]
    want = hf_greedy(hf, PROMPTS, NEW)
    assert ours(gen, PROMPTS, NEW) == want
    assert ours(gen, MORE_PROMPTS, NEW) == hf_greedy(hf, MORE_PROMPTS, NEW)
    # sampling that can only pick the argmax is greedy
    assert ours(gen, PROMPTS, NEW, sampling=SamplingConfig(temperature=2.0, top_k=1, seed=0)) == want
    assert ours(gen, PROMPTS, NEW, sampling=SamplingConfig(temperature=2.0, top_p=1e-6, seed=0)) == want
    # EOS: a token greedy decoding produces mid-way ends that row where transformers ends it
    eos = want[0][NEW // 2]
    assert ours(gen, PROMPTS, NEW, eos_ids=[eos]) == hf_greedy(hf, PROMPTS, NEW, eos=eos)
    # 5 requests × 11 decode steps, yet each graph was compiled exactly once
    counts = gen.compile_counts
    assert counts["prefill[32]"] == counts["decode"] == 1 and set(counts.values()) == {1}
    # both graphs went through the pass pipeline: fused norms/RoPE everywhere, fused causal attention
    # in the prefill; decode attention over the cache stays plain ops (not square causal attention)
    layers = model.config.num_hidden_layers
    fired = {kind: {r.name: r.counters.get("replaced", 0) for r in g.fn.result.records}
             for kind, g in (("prefill", gen.prefill_graph(32)), ("decode", gen.decode_graph()))}
    assert fired["prefill"]["fuse_attention"] == layers and fired["decode"]["fuse_attention"] == 0
    assert fired["prefill"]["fuse_rope"] == fired["decode"]["fuse_rope"] == 2 * layers


# The other families: windows of 6 (prompt + new tokens run past them), Phi-3's partial RoPE, GLM-4's
# interleaved RoPE and sandwich norms, Gemma's soft-capping, scaled embedding, q/k norms and local RoPE base.
@pytest.mark.parametrize("family", ["mistral-window", "phi3-window", "glm4", "gemma2", "gemma3"])
def test_greedy_ids_equal_transformers_other_families(family: str, tmp_path: Path) -> None:
    hf, model = _pair(family, tmp_path)
    gen = StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="eager")
    assert ours(gen, PROMPTS, NEW) == hf_greedy(hf, PROMPTS, NEW), family
    assert gen.compile_counts == {"prefill[32]": 1, "decode": 1}


def test_longrope_generation_beyond_the_original_length_is_refused(tmp_path: Path) -> None:
    _, model = _pair("phi3-longrope-partial", tmp_path)
    with pytest.raises(GraphllmError, match=r"--max-len 64 exceeds .*original_max_position_embeddings=8"):
        StaticGenerator(model, batch_size=1, max_len=MAX_LEN, backend="eager")


@pytest.mark.slow
def test_greedy_ids_equal_transformers_on_inductor(tmp_path: Path) -> None:
    hf, model = _pair("llama", tmp_path)
    gen = StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="inductor")
    assert ours(gen, PROMPTS, NEW) == hf_greedy(hf, PROMPTS, NEW)
    assert ours(gen, MORE_PROMPTS, NEW) == hf_greedy(hf, MORE_PROMPTS, NEW)
    assert gen.compile_counts == {"prefill[32]": 1, "decode": 1}


class _ByteTok:
    """Token id = byte value: exercises stop strings on text without a trained tokenizer."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_stop_string_cuts_the_text_and_bad_prompts_are_refused(generators: dict) -> None:
    _, model, gen = generators["llama"]
    tok = _ByteTok()
    full = generate_text(gen, tok, [PROMPTS[2]], max_new_tokens=NEW)[0]  # 32-token bucket: compiled already
    assert full.finish_reason == "length" and len(full.token_ids) == NEW
    stop = full.text[4:6]
    streamed: list[str] = []
    cut = generate_text(gen, tok, [PROMPTS[2]], max_new_tokens=NEW, stop=[stop],
                        on_text=lambda i, piece: streamed.append(piece))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(streamed) == cut.text
    # graphllm eval's hook: text prompts, cut at stop strings
    scorer = types.SimpleNamespace(model=model, tokenizer=tok, batch_size=3, max_length=MAX_LEN, backend="eager",
                                   _static_generator=gen)
    assert generate_until(scorer, [tok.decode(PROMPTS[2])] * 2, stop=[stop], max_new_tokens=NEW) == [cut.text] * 2
    with pytest.raises(GraphllmError, match="--max-len"):
        next(gen.run([list(range(60))], max_new_tokens=NEW))
    with pytest.raises(GraphllmError, match="batch size 3"):
        next(gen.run(PROMPTS + [[1]], max_new_tokens=NEW))


def _tiny_chat_checkpoint(tmp_path: Path) -> Path:
    """A 1-layer llama with a byte-level BPE tokenizer that has a chat template, saved as an HF dir."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there, how are you today? I am fine.", "user assistant system"] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                 pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path / "chat-model"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_generate_and_chat_commands(tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt = _tiny_chat_checkpoint(tmp_path)
    rc = main(["generate", "--model", str(ckpt), "--prompt", "hello there", "--max-new-tokens", "8", "--greedy",
               "--backend", "eager"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip(), err
    assert re.search(r"prompt \d+ tokens, [\d.]+ tok/s \| decode \d+ tokens, [\d.]+ tok/s", err)

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhello\n/reset\nhello\n/exit\nnever read\n"))
    rc = main(["chat", "--model", str(ckpt), "--max-new-tokens", "6", "--greedy", "--backend", "eager",
               "--max-len", "128"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", err)]
    assert len(prompts) == 3 and prompts[1] > prompts[0] and prompts[2] == prompts[0]  # history, then reset
    assert "[history cleared]" in err and "never read" not in out
    turns = re.split(r"^>>> hello\n", out, flags=re.MULTILINE)[1:]
    assert len(turns) == 3 and turns[0] == turns[2]  # greedy: the same conversation gives the same reply


def test_bad_input_exits_2(capsys) -> None:
    assert main(["generate", "--model", "tiny-llama", "--prompt", "x", "--top-p", "0"]) == EXIT_USER_ERROR
    assert main(["chat", "--model", "tiny-llama", "--backend", "eager"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--top-p" in err and "chat template" in err
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == EXIT_USER_ERROR
    assert main(["generate", "--model", "tiny-llama", "--prompt", "x", "--max-new-tokens", "5000",
                 "--backend", "eager"]) == EXIT_USER_ERROR
    assert "--max-new-tokens must be in [1, 2047]" in capsys.readouterr().err
