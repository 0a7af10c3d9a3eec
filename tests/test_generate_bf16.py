"""bf16 generation: weights stored in bf16 (not autocast), the KV cache in bf16, RoPE's inv_freq kept in
float32; greedy ids equal transformers' own bf16 generate on the same weights."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.models import load_model
from hf_parity import hf_model, save_hf_checkpoint
from test_generate import NEW, PROMPTS, _tiny_chat_checkpoint, hf_greedy, ours

from graphllm.errors import GraphllmError
from graphllm.generate import StaticGenerator

MAX_LEN = 64
FP32_ORDER_TOL = 1e-5  # the same sums in another order (docs/architecture.md's tolerance policy)
# bf16 keeps 8 significant bits: the same bf16 weights through a different kernel order (graphllm's
# decode splits attention into cache + own key; SDPA vs matmul) round differently by ~1 bf16 ulp per
# op, so logits of the same inputs agree to a few ulps of their scale, not bitwise
BF16_LOGITS_TOL = 2e-2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """transformers' llama loaded in bf16 (from_pretrained(dtype=bfloat16), its usual bf16 path) and
    graphllm's generator over the same checkpoint cast to bf16 (eager backend: compiles in seconds), with
    the decode_gemv pass that inductor gets by default."""
    import transformers

    path = save_hf_checkpoint(hf_model("llama", "sdpa").eval(), "llama", tmp_path_factory.mktemp("bf16") / "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
    model = load_model(path)
    return hf, model, StaticGenerator(model, batch_size=3, max_len=MAX_LEN, backend="eager", dtype="bf16", gemv=True)


def test_bf16_weights_cache_and_rope(pair) -> None:
    hf, model, gen = pair
    params = {p.dtype for p in model.parameters()}
    assert params == {torch.bfloat16}, params  # stored bf16: no fp32 master copy kept alongside
    assert gen.k_cache.dtype == gen.v_cache.dtype == torch.bfloat16
    # RoPE angles from the float32 inv_freq, as transformers keeps it (a bf16 inv_freq shifts every angle)
    assert model.model.inv_freq.dtype == torch.float32
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.inv_freq, hf.model.rotary_emb.inv_freq)


def test_bf16_greedy_ids_equal_transformers_bf16(pair) -> None:
    hf, _, gen = pair
    want = hf_greedy(hf, PROMPTS, NEW)
    assert ours(gen, PROMPTS, NEW) == want
    assert gen.compile_counts == {"prefill[32]": 1, "decode": 1}
    # every decode linear (q, k, v, o, gate, up, down per layer, and the LM head) and both attention
    # matmuls over the cache per layer became reductions;
    # the prefill's (96 rows: GEMMs) stay linears
    replaced = {kind: {r.name: r.counters.get("replaced") for r in g.fn.result.records}.get("decode_gemv")
                for kind, g in (("prefill", gen.prefill_graph(32)), ("decode", gen.decode_graph()))}
    assert replaced == {"prefill": None, "decode": 9 * hf.config.num_hidden_layers + 1}


def test_decode_gemv_fires_only_on_few_rows() -> None:
    from graphllm.compile import compile as compile_model
    from graphllm.generate.gemv import decode_gemv

    lin = torch.nn.Linear(16, 24).eval()
    x = torch.randn(4, 16)
    for max_rows, fires in ((4, 1), (3, 0)):  # 4 rows: a GEMV at max_rows 4, a GEMM (left to BLAS) at 3
        fn = compile_model(lin, (x,), backend="eager", passes=[decode_gemv.with_options(max_rows=max_rows)],
                           purpose="generate")
        counts = {r.name: r.counters.get("replaced", 0) for r in fn.result.records}
        assert counts["decode_gemv"] == fires
        with torch.no_grad():
            err = ((fn(x) - lin(x)).abs().max() / lin(x).abs().max()).item()
        assert err < FP32_ORDER_TOL, f"decode_gemv (max_rows={max_rows}) vs nn.Linear: rel err {err:.1e}"


def test_bf16_prefill_logits_match_transformers_bf16(pair) -> None:
    """The prompt's last-token logits are bf16 and equal transformers' bf16 ones within bf16 rounding
    (and differ from the fp32 model's by more than fp32 rounding would: the arithmetic really is bf16)."""
    hf, model, gen = pair
    prompt = torch.tensor([PROMPTS[2]])
    S = 32
    ids = torch.zeros(3, S, dtype=torch.long)
    ids[0, : prompt.shape[1]] = prompt
    lengths = torch.tensor([prompt.shape[1], 1, 1])
    with torch.no_grad():
        logits, k, _ = gen.prefill_graph(S).fn(ids, lengths)
        want = hf(prompt).logits[0, -1]
        fp32 = hf.float()(prompt).logits[0, -1]
        hf.to(torch.bfloat16)  # back to the shared fixture's dtype (inv_freq stays float32 in transformers)
    assert logits.dtype == k.dtype == torch.bfloat16
    err = ((logits[0].float() - want.float()).abs().max() / want.float().abs().max()).item()
    off = ((logits[0].float() - fp32).abs().max() / fp32.abs().max()).item()
    assert err < BF16_LOGITS_TOL, f"bf16 logits vs transformers bf16: rel err {err:.2e}"
    assert off > 1e-4, f"bf16 logits equal fp32 ones to {off:.1e}: not computed in bf16?"


def test_bad_dtypes_are_refused(tmp_path: Path) -> None:
    model = load_model(save_hf_checkpoint(hf_model("llama", "sdpa"), "llama", tmp_path / "llama"))
    with pytest.raises(GraphllmError, match=r"--dtype must be one of fp32, bf16, got 'fp16'"):
        StaticGenerator(model, max_len=MAX_LEN, backend="eager", dtype="fp16")
    with pytest.raises(GraphllmError, match=r"does not autocast.*dtype='bf16'"):
        StaticGenerator(model, max_len=MAX_LEN, backend="eager", amp="bf16")
    model.to(torch.bfloat16).model.norm.to(torch.float16)
    with pytest.raises(GraphllmError, match=r"the model has bfloat16, float16"):
        StaticGenerator(model, max_len=MAX_LEN, backend="eager")


def test_generate_command_bf16(tmp_path: Path, capsys) -> None:
    ckpt = _tiny_chat_checkpoint(tmp_path)
    rc = main(["generate", "--model", str(ckpt), "--prompt", "hello there", "--max-new-tokens", "6", "--greedy",
               "--backend", "eager", "--dtype", "bf16"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip(), err
    assert re.search(r"decode \d+ tokens, [\d.]+ tok/s", err)
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage line, exit 2
        main(["generate", "--model", str(ckpt), "--prompt", "x", "--dtype", "fp16"])
    assert exc.value.code == EXIT_USER_ERROR and "--dtype" in capsys.readouterr().err
