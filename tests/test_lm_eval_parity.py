"""lm-evaluation-harness parity (graphllm/eval/lm_eval_adapter.py): perplexity-style requests score as the
harness's own HF model (HFLM) scores them on the same weights.

- rolling windows equal lm_eval's `get_rolling_token_windows` + `make_disjoint_window` for every length;
- an empty context is the prefix token by HFLM's rule (override, else BOS, else EOS; was: always EOS);
- `loglikelihood_rolling` and empty-context `loglikelihood` equal HFLM's on a micro Llama with a BPE tokenizer
  that has a BOS, within LM_EVAL_ATOL.
Needs lm_eval (the test extra installs it; `pip install 'graphllm[lm-eval]'` for users).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from graphllm.eval.scorer import rolling_windows  # noqa: E402

MAX_LENGTH = 16
LM_EVAL_ATOL = 1e-4
"""Summed log-probs (tens of nats over ~40 tokens), graphllm's compiled fp32 forward vs transformers' eager one
on the same weights: the same arithmetic in another order, ~1e-6 per token; a wrong window or prefix token moves
a text's sum by O(1) nats (SmolLM2: up to 0.74 with EOS in place of BOS)."""
VOCAB = 1024


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 31, 32, 33, 50])
def test_windows_equal_the_harness(n: int) -> None:
    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, MAX_LENGTH, 1)]
    assert rolling_windows(tokens, 7, MAX_LENGTH) == [tuple(w) for w in theirs]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS
    from test_data_match import save_tokenizer

    path = tmp_path_factory.mktemp("lm_eval") / "micro"
    cfg = dataclasses.replace(PRESETS["tiny-llama"](), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    save_hf(build_model(cfg, seed=0), cfg, path)
    save_tokenizer(path, vocab_size=VOCAB)
    return path


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_rolling_and_empty_context_equal_hflm(hf_dir: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    from graphllm.data.corpus import builtin_documents
    from graphllm.eval.lm_eval_adapter import GraphllmLM

    hf = HFLM(pretrained=str(hf_dir), backend="causal", max_length=MAX_LENGTH, batch_size=4, device="cpu",
              dtype="float32")
    ours = GraphllmLM(model=str(hf_dir), backend="eager", batch_size=4, max_length=MAX_LENGTH)
    assert ours.scorer.prefix_id == hf.prefix_token_id == hf.tokenizer.bos_token_id != hf.tokenizer.eos_token_id
    texts = [d[:200] for d in builtin_documents()[:3]] + ["short"]
    rolling = _requests("loglikelihood_rolling", [(t,) for t in texts])
    theirs, mine = hf.loglikelihood_rolling(rolling), ours.loglikelihood_rolling(rolling)
    assert max(len(ours.scorer.tokenizer.encode(t)) for t in texts) > 2 * MAX_LENGTH  # several windows
    assert max(abs(a - b) for a, b in zip(mine, theirs)) <= LM_EVAL_ATOL, (mine, theirs)
    empty = _requests("loglikelihood", [("", " the cat"), ("", texts[0][:24])])
    got, want = ours.loglikelihood(empty), hf.loglikelihood(empty)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) <= LM_EVAL_ATOL, (got, want)
    override = GraphllmLM(scorer=ours.scorer, prefix_token_id=5)  # a given scorer keeps its own rule
    assert override.scorer.prefix_id == ours.scorer.prefix_id


def test_prefix_token_rule() -> None:
    """HFLM.prefix_token_id: the override, else BOS, else EOS."""
    from types import SimpleNamespace

    from graphllm.eval.scorer import GraphScorer
    from graphllm.models import load_model

    model = load_model("tiny-llama")

    def prefix(bos, eos, override=None) -> int:
        return GraphScorer(model, SimpleNamespace(bos_id=bos, eos_id=eos), prefix_token_id=override).prefix_id

    assert prefix(1, 2) == 1 and prefix(None, 2) == 2 and prefix(1, 2, override=3) == 3


def test_lm_eval_command_line_scores_a_local_perplexity_task_like_hf(hf_dir: Path, tmp_path: Path) -> None:
    """`python -m graphllm.eval.lm_eval_cli run --model graphllm ...` on a local task (json data, rolling
    log-likelihood, the harness's perplexity metrics) prints the same figures as `--model hf`."""
    import json
    import os
    import subprocess
    import sys

    from graphllm.data.corpus import builtin_documents

    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": d[:300]}) + "\n" for d in builtin_documents()[:4]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_ppl.yaml").write_text(
        "task: local_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = tmp_path / "out"

    def run(model: str, args: str, module: str) -> dict:
        cmd = [sys.executable, "-m", module, "run", "--model", model, "--model_args", args, "--batch_size", "4",
               "--device", "cpu",
               "--tasks", "local_ppl", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out / model)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (result,) = (out / model).rglob("results_*.json")
        return json.loads(result.read_text())["results"]["local_ppl"]

    ours = run("graphllm", f"model={hf_dir},backend=eager,max_length={MAX_LENGTH}", "graphllm.eval.lm_eval_cli")
    theirs = run("hf", f"pretrained={hf_dir},max_length={MAX_LENGTH},dtype=float32", "lm_eval")
    for metric in ("bits_per_byte,none", "word_perplexity,none"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=1e-5), (metric, ours, theirs)
