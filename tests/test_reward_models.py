"""Reward models as compiled graphs (graphllm/tasks/): the outcome reward model (`--task rm`) and the process
reward model (`--task prm`).

- the rm step's loss and gradients equal an eager Bradley–Terry computation on the same model (fp32 ≤ 1e-5);
- an ORM trained on "prefer the sorted list" reaches ≥ 90% pairwise accuracy on held-out digit sets, and
  `graphllm convert graphllm-to-hf` of its checkpoint is a transformers *ForSequenceClassification directory
  that scores right-padded rows as graphllm does (fp32 ≤ 1e-5);
- the prm step equals MindSpeed-LLM's PRM objective written out here (cross-entropy over the two reward
  tokens at the step tags, accuracy), on data from `graphllm preprocess prm`.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphllm.cli.main import main
from hf_parity import rel_err
from test_tasks import SEQ, write_sorted_prefs

PARITY_RTOL = 1e-5
"""fp32, graph (or transformers) vs eager PyTorch: the same arithmetic in another reduction order / with fused
ops; max |a − b| / max |b| (docs/architecture.md's policy)."""
RM_GRAD_RTOL = 1e-4
"""rm gradients vs float64 eager: the whole gradient flows from the B final tokens through one scalar head, and
fp32 rounding alone moves its worst element by ~4e-5 of the largest (measured: graph 4.1e-5, eager fp32 PyTorch
3.9e-5, both against float64), so the 1e-5 element bound would measure rounding; a wrong index or a missing
term shows as O(1)."""
TENSOR_GRAD_RTOL = 5e-5
"""prm: each tensor's gradient against its own largest element (the whole gradient is held to PARITY_RTOL);
that normalisation magnifies fp32 rounding in tensors with small gradients (tests/test_dpo.py: ~1e-5 each side
from float64)."""
HELD_OUT_ACCURACY = 0.9


def _plan(kind: str, batch_size: int = 4):
    from graphllm.plan import CompilePlan
    from graphllm.planning.task_config import TaskConfig

    return CompilePlan(model="tiny-llama", backend="eager", batch_size=batch_size, seq_len=SEQ,
                       task=TaskConfig(kind=kind))


def _feed(prefix: str, task: str, rows: int):
    from graphllm.data.datasets import open_data
    from graphllm.data.feed import DatasetFeed

    splits = open_data([prefix], seq_len=SEQ, split="1,0,0", vocab_size=8000, task=task)
    return DatasetFeed(splits, global_batch_size=rows, seed=0, with_positions=False, reward_ids=splits.reward_ids)


def _eager_rewards(rm, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's score at its final token: one past its last label (a Python loop, not the graph's argmax)."""
    hidden = rm.model(ids)  # [B, S, H]
    out = []
    for b in range(ids.shape[0]):
        labelled = [t for t in range(ids.shape[1]) if labels[b, t] != -100]
        out.append(rm.score(hidden[b, min(labelled[-1] + 1, ids.shape[1] - 1)]))
    return torch.cat(out)


def test_rm_step_equals_eager_bradley_terry(tmp_path) -> None:
    from graphllm.job import build

    prefix = write_sorted_prefs(tmp_path, sets=10, per_set=2)
    built = build(_plan("rm"), warm=False)
    assert sorted(n for n, _ in built.model.named_parameters() if not n.startswith("model.")) == ["score.weight"]
    eager = copy.deepcopy(built.model).double()
    ids, labels = _feed(prefix, "rm", 4).train_batch(0)
    loss = built.engine.forward_backward(ids, labels)
    r = _eager_rewards(eager, ids, labels)
    want = torch.log1p(torch.exp(-(r[0::2] - r[1::2]))).mean()  # Bradley–Terry: −log σ(r_w − r_l)
    want.backward()
    assert abs(loss - want.item()) / want.item() < PARITY_RTOL, (loss, want.item())
    got = dict(built.model.named_parameters())
    for name, p in eager.named_parameters():
        err = rel_err(got[name].grad.double(), p.grad)
        assert err < RM_GRAD_RTOL, (name, err, "pytest tests/test_reward_models.py -k equals_eager")
    assert built.engine.metrics["accuracy"] == (r[0::2] > r[1::2]).float().mean().item()


def _padded_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random lengths, right-padded with id 0; labels on the second half of each row's tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    labels = torch.full((n, SEQ), -100)
    for b in range(n):
        length = int(torch.randint(8, SEQ + 1, (1,), generator=g))
        ids[b, :length] = torch.randint(3, 8000, (length,), generator=g)
        labels[b, length // 2:length - 1] = ids[b, length // 2 + 1:length]  # aligned: position t's label is t+1
    return ids, labels


def test_orm_learns_sorted_preference_and_exports_to_transformers(tmp_path) -> None:
    import transformers

    from graphllm.job import load_artifact
    from graphllm.resume import load_step
    from graphllm.train import TrainConfig

    prefix = write_sorted_prefs(tmp_path / "data")
    art, metrics, ckpt, hf = tmp_path / "art", tmp_path / "m.jsonl", tmp_path / "ckpt", tmp_path / "hf"
    assert main(["compile", "--model", "tiny-llama", "--task", "rm", "--backend", "eager", "--batch-size", "8",
                 "--seq-len", str(SEQ), "--out", str(art)]) == 0
    steps = 40  # held-out accuracy measured 0.96 at 40 steps (lr 3e-3 and 1e-3), 0.94 at 20
    assert main(["run", str(art), "--data", prefix, "--split", "80,20,0", "--steps", str(steps), "--no-progress",
                 "--eval-interval", str(steps), "--eval-iters", "32", "--metrics", str(metrics), "--save", str(ckpt),
                 "--threads", "1"]) == 0
    final = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "eval"][-1]
    assert final["valid_accuracy"] >= HELD_OUT_ACCURACY, final

    assert main(["convert", "graphllm-to-hf", "--ckpt", str(ckpt), "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    _, built = load_artifact(art)  # the trained reward model, as graphllm holds it
    load_step(ckpt, built, built.engine.make_optimizer(TrainConfig()))
    ids, labels = _padded_rows(8)
    with torch.no_grad():
        want = built.model.rewards(ids, labels)
        got = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0]
    assert rel_err(got, want) < PARITY_RTOL, (got, want)


def _write_prm(out: Path, records: int = 24, seed: int = 0) -> str:
    """Step-labelled records: a question of two digits, two one-digit steps, each marked + or - at random."""
    rng = random.Random(seed)
    lines = [{"system": "S", "question": f"{rng.randint(0, 9)} {rng.randint(0, 9)}",
              "steps": [str(rng.randint(0, 9)), str(rng.randint(0, 9))],
              "labels": [rng.choice("+-"), rng.choice("+-")]} for _ in range(records)]
    (out / "prm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    prefix = str(out / "prm")
    assert main(["preprocess", "prm", "--input", str(out / "prm.jsonl"), "--tokenizer", "builtin",
                 "--prompt-template", "alpaca", "--seq-len", str(SEQ), "--out", prefix]) == 0
    return prefix


def test_prm_step_is_mindspeeds_objective(tmp_path) -> None:
    from graphllm.job import build

    prefix = _write_prm(tmp_path)
    meta = json.loads(Path(prefix + "_meta.json").read_text())["prm"]
    ids, labels, reward_ids = _feed(prefix, "prm", 4).train_batch(0)
    assert reward_ids.tolist() == [[meta["good_id"], meta["bad_id"]]] * 4
    tags = labels != -100
    assert tags.sum() == 8 and (ids[:, 1:][tags[:, :-1]] == meta["step_tag_ids"][0]).all()  # the next token: a tag
    built = build(_plan("prm"), warm=False)
    eager = copy.deepcopy(built.model)
    loss = built.engine.forward_backward(ids, labels, reward_ids)
    # MindSpeed-LLM PRMTrainer.loss_func with --reward-tokens: the logits at the tags, restricted to the reward
    # tokens; the label's index among them is the target; mean cross-entropy; accuracy of the argmax
    logits = eager(ids)[tags][:, [meta["good_id"], meta["bad_id"]]].float()  # [tags, 2]
    target = (labels[tags] == meta["bad_id"]).long()
    want = F.cross_entropy(logits, target)
    want.backward()
    assert abs(loss - want.item()) / want.item() < PARITY_RTOL, (loss, want.item())
    got = dict(built.model.named_parameters())
    whole = rel_err(torch.cat([got[n].grad.flatten() for n, _ in eager.named_parameters()]),
                    torch.cat([p.grad.flatten() for _, p in eager.named_parameters()]))
    assert whole < PARITY_RTOL, whole
    for name, p in eager.named_parameters():
        assert rel_err(got[name].grad, p.grad) < TENSOR_GRAD_RTOL, (name, rel_err(got[name].grad, p.grad))
    assert built.engine.metrics["accuracy"] == pytest.approx((logits.argmax(-1) == target).float().mean().item())
