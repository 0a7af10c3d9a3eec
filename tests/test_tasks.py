"""Training objectives (graphllm/tasks/): the loss formulas, pairwise data and what `graphllm run` refuses.

- DPO (each variant), SimPO and Bradley–Terry equal reference formulas written out here from their sources;
- sequence log-probabilities equal log_softmax + gather;
- pairwise data from `graphllm preprocess pairwise` comes out as interleaved (chosen, rejected) rows, in a
  resumable order of pairs, and the data-parallel slices keep pairs whole;
- pairwise data with --task lm, SFT data with --task dpo, no data with --task dpo: one line naming the
  kind, exit 2, nothing written.

`write_sorted_prefs` (the synthetic "prefer the sorted list" set) is shared with test_dpo.py and
test_reward_models.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.tasks import losses

FORMULA_TOL = 1e-6
"""Formula vs formula on the same float64 log-probs: the two sides differ only in how the expression is
arranged (logsigmoid vs log1p(exp), relu vs max), ~1e-15 apart; 1e-6 is the brief's bound."""
SEQ = 32


def write_sorted_prefs(out: Path, *, sets: int = 210, per_set: int = 3, seed: int = 0) -> str:
    """The "prefer the sorted list" preference set: a prompt shows 4 distinct digits in random order, the
    chosen response lists them sorted, the rejected one in another (unsorted) order. Sets are shuffled and
    each set's pairs are consecutive, so the last documents (the valid split) hold digit sets the train split
    never shows. Preprocessed with the built-in tokenizer and the Alpaca template (32 tokens a row); returns
    the dataset prefix."""
    rng = random.Random(seed)
    combos = list(itertools.combinations(range(10), 4))
    rng.shuffle(combos)
    lines = []
    for digits in combos[:sets]:
        for _ in range(per_set):
            shown, rejected = list(digits), list(digits)
            rng.shuffle(shown)
            while rejected == sorted(rejected):
                rng.shuffle(rejected)
            lines.append({"system": "Sort.", "prompt": " ".join(map(str, shown)),
                          "chosen": " ".join(map(str, sorted(digits))), "rejected": " ".join(map(str, rejected))})
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    prefix = str(out / "prefs")
    assert main(["preprocess", "pairwise", "--input", str(out / "prefs.jsonl"), "--tokenizer", "builtin",
                 "--prompt-template", "alpaca", "--seq-len", str(SEQ), "--out", prefix]) == 0
    return prefix


# -- formulas -----------------------------------------------------------------------------------------
def _logps(n: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1 for _ in range(4)]


def _ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL DPOTrainer.dpo_loss, written per element: h = (πc − πr) − (refc − refr);
    sigmoid (Rafailov et al. eq. 7; cDPO label smoothing, Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh);
    ipo (Azar et al. eq. 17): (h − 1/(2β))²; hinge (SLiC): max(0, 1 − βh)."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - b) - (c - d)
        if loss_type == "sigmoid":
            out.append((1 - ls) * math.log1p(math.exp(-beta * h)) + ls * math.log1p(math.exp(beta * h)))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type, ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_equal_the_reference_formulas(loss_type, ls) -> None:
    pc, pr, rc, rr = _logps()
    beta = 0.1
    got, rew_c, rew_r = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    want = _ref_dpo(pc, pr, rc, rr, beta, loss_type, ls)
    assert (got - want).abs().max() < FORMULA_TOL, (loss_type, ls)
    assert torch.allclose(rew_c, beta * (pc - rc), atol=FORMULA_TOL) and torch.allclose(rew_r, beta * (pr - rr),
                                                                                          atol=FORMULA_TOL)


def test_simpo_and_bradley_terry_equal_the_reference_formulas() -> None:
    pc, pr, _, _ = _logps(seed=1)
    lc, lr = torch.randint(1, 30, (64,)).double(), torch.randint(1, 30, (64,)).double()
    avg_c, avg_r = pc / lc, pr / lr
    beta, gamma = 2.0, 0.5
    got, rew_c, _ = losses.simpo_loss(avg_c, avg_r, beta=beta, gamma=gamma)
    # SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ)
    want = torch.tensor([math.log1p(math.exp(-(beta / a * x - beta / b * y - gamma)))
                         for x, y, a, b in zip(pc.tolist(), pr.tolist(), lc.tolist(), lr.tolist())],
                        dtype=torch.float64)
    assert (got - want).abs().max() < FORMULA_TOL and torch.allclose(rew_c, beta * pc / lc, atol=FORMULA_TOL)
    rc, rr = pc / 10, pr / 10
    # Bradley–Terry (Ouyang et al. 2022 eq. 1): −log σ(r_w − r_l)
    want_bt = torch.tensor([math.log1p(math.exp(-(a - b))) for a, b in zip(rc.tolist(), rr.tolist())],
                           dtype=torch.float64)
    assert (losses.bradley_terry_loss(rc, rr) - want_bt).abs().max() < FORMULA_TOL


def test_sequence_logps_sum_the_label_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, 11, generator=g)
    labels = torch.randint(0, 11, (4, 8), generator=g)
    labels[:, :3] = -100
    labels[3] = -100  # a row without label tokens: 0 (sum), 0 (average: counted as one token)
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # [4, 8]
    mask = labels != -100
    want = (logp * mask).sum(-1)
    assert torch.allclose(losses.sequence_logps(logits, labels), want, atol=1e-5)
    avg = losses.sequence_logps(logits, labels, average=True)
    assert torch.allclose(avg, want / mask.sum(-1).clamp(min=1), atol=1e-5) and avg[3] == 0
    assert torch.equal(losses.split_pairs(torch.arange(6))[0], torch.tensor([0, 2, 4]))
    assert F.logsigmoid(torch.tensor(0.0)) == -math.log(2)  # the loss of a pair the policy cannot tell apart


# -- pairwise data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    return write_sorted_prefs(tmp_path_factory.mktemp("prefs"), sets=30, per_set=2)


def test_pairwise_rows_interleave_pairs_in_a_resumable_order(prefs: str) -> None:
    from graphllm.data.datasets import open_data
    from graphllm.data.feed import DatasetFeed
    from graphllm.data.indexed import IndexedReader

    splits = open_data([prefs], seq_len=SEQ, split="1,0,0", vocab_size=8000, task="dpo")
    assert splits.kind == "pairwise" and len(splits.train) == 60 and splits.overlong == 0
    feed = DatasetFeed(splits, global_batch_size=8, seed=3, with_positions=False)
    ids, labels = feed.train_batch(5)
    assert ids.shape == labels.shape == (8, SEQ)
    pairs = feed.sampler.batch(5)
    assert len(pairs) == 4  # 8 rows = 4 pairs
    chosen = IndexedReader(prefs + "_chosen_input_ids_document")
    rejected_labels = IndexedReader(prefs + "_rejected_labels_document")
    for k, pair in enumerate(pairs):  # row 2k is pair k's chosen, row 2k+1 its rejected; labels shifted by one
        doc = chosen.document(int(pair))[0]
        assert torch.equal(ids[2 * k, :len(doc)], torch.from_numpy(doc.astype("int64")))
        lab = rejected_labels.document(int(pair))[0]
        assert torch.equal(labels[2 * k + 1, :len(lab) - 1], torch.from_numpy(lab[1:].astype("int64")))
    assert feed.state(2)["sampler"]["consumed_samples"] == 8  # the state counts pairs
    again = DatasetFeed(splits, global_batch_size=8, seed=3, with_positions=False)
    again.resume(feed.state(3), 3, "test")  # a run resumed after step 3 draws the pairs of the uninterrupted one
    assert all(torch.equal(a, b) for a, b in zip(again.train_batch(4), feed.train_batch(4)))


def test_data_parallel_slices_keep_pairs_whole() -> None:
    from graphllm.parallel.engine import Engine
    from graphllm.planning import Layout

    rows = torch.arange(8)[:, None].expand(8, 3)  # rows 0..7: pairs (0, 1), (2, 3), ...
    for dp_rank in range(2):
        st = type("St", (), {"coords": type("C", (), {"dp": dp_rank})()})()
        engine = Engine(layout=Layout(dp=2, micro_batches=2), st=st, named_params={}, micro_batch_size=2)
        for mb in engine.local_rows(rows).chunk(2):
            assert mb[0, 0] % 2 == 0 and mb[1, 0] == mb[0, 0] + 1  # each micro-batch holds one whole pair


# -- refused input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from graphllm.job import compile_artifact
    from graphllm.plan import CompilePlan
    from graphllm.planning.task_config import TaskConfig

    root = tmp_path_factory.mktemp("task_art")
    out = {}
    for kind in ("lm", "dpo"):
        out[kind] = root / kind
        compile_artifact(CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=SEQ,
                                     task=TaskConfig(kind=kind)), out[kind])
    return out


@pytest.mark.parametrize("task, data, needle", [
    ("lm", "pairs", "is pairwise data, which --task lm does not train on"),
    ("dpo", "sft", "is sft data, which --task dpo does not train on"),
    ("dpo", None, "--task dpo, which needs --data"),
])
def test_wrong_data_for_the_task_is_one_line_and_writes_nothing(artifacts, prefs, tmp_path, capsys, task, data,
                                                                needle) -> None:
    from dataset_fixtures import write_sft

    write_sft(tmp_path / "sft", [1] * 10, vocab=8000, seq_len=None, packed=False)
    paths = {"pairs": prefs, "sft": str(tmp_path / "sft")}
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    argv = ["run", str(artifacts[task]), "--steps", "1", "--no-progress", "--metrics", str(metrics), "--save",
            str(ckpt)] + (["--data", paths[data]] if data else [])
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not metrics.exists() and not ckpt.exists() and not (artifacts[task] / "runs").exists()
