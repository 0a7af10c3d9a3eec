"""DPO-step benchmark: graphllm's compiled DPO step vs a TRL-style eager step on HF transformers.

One step = zero_grad + the DPO objective's forward and backward + gradient clipping (1.0) + fused AdamW,
on the same weights (checked equal), the same batch of interleaved (chosen, rejected) rows and fp32:

- graphllm: `graphllm.job.build` of `--task dpo --reference graph` (the reference is a forward-only graph
  compiled once through the same pipeline; the step graph computes log-probs, the loss and TRL's metrics);
- trl-eager: what TRL's DPOTrainer does per step, written out (TRL itself is not needed): the policy
  `transformers.LlamaForCausalLM` forward over the concatenated pairs, the reference (a frozen copy) forward
  under no_grad, per-token log-probs by log_softmax + gather summed over the label tokens, the sigmoid loss.

The contenders run interleaved in one process (benchmarks/common.py): a first (compiling) step each,
warm-up steps, then `--rounds` rounds of `--steps-per-round` steps, the order rotated each round; the
figures are medians, the ratio is trl-eager's median step over graphllm's (> 1: graphllm is faster).

    python benchmarks/dpo_step.py --model tiny-llama --pairs 4 --seq 128 --backend inductor
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` and `train_step` when run as a script
from common import Stopwatch, ensure_inductor_cache, interleave, median, timed  # noqa: E402

CACHE_DIR, CACHE_WARM = ensure_inductor_cache()  # before torch reads its inductor config

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402

from graphllm.train import TrainConfig  # noqa: E402
from train_step import hf_adamw, hf_model_like  # noqa: E402

CONTENDERS = ("graphllm", "trl-eager")
LOSS_RTOL = 1e-4
"""Loss agreement (fp32) at the second step, after one AdamW update from the same gradients (at the first step
the policy is the reference, so both losses are exactly log 2): fused vs unfused ops agree to ~1e-6
(tests/test_dpo.py: 1e-5), and Adam's first update can magnify the order difference of near-zero gradients."""


def make_batch(vocab: int, pairs: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2·pairs rows (chosen, rejected interleaved) of random tokens; the first half of each row is the prompt
    (labels -100), the rest is trained (labels aligned: labels[:, t] is the token after t)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(3, vocab, (2 * pairs, seq + 1), generator=g)
    ids, labels = tok[:, :-1].contiguous(), tok[:, 1:].clone()
    labels[:, : seq // 2] = -100
    return ids, labels


def trl_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's per-sequence log-probs: log_softmax, gather the labels, mask, sum → [B]."""
    mask = labels != -100
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


class TrlEager:
    """Policy and frozen reference on transformers, the DPO sigmoid loss outside (as TRL computes it)."""

    def __init__(self, source, beta: float) -> None:
        self.policy = hf_model_like(source)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.opt = hf_adamw(self.policy, TrainConfig())
        self.beta = beta

    def step(self, ids: torch.Tensor, labels: torch.Tensor, sw: Stopwatch) -> float:
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = trl_logps(self.reference(input_ids=ids, use_cache=False).logits, labels)
        pol = trl_logps(self.policy(input_ids=ids, use_cache=False).logits, labels)
        h = (pol[0::2] - pol[1::2]) - (ref[0::2] - ref[1::2])
        loss = -F.logsigmoid(self.beta * h).mean()
        sw.lap("fwd")
        loss.backward()
        sw.lap("bwd")
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        sw.lap("opt")
        return loss.item()


class Graphllm:
    """`--task dpo --reference graph` built through graphllm.job (the engine runs the reference graph)."""

    def __init__(self, model: str, pairs: int, seq: int, backend: str, beta: float, seed: int) -> None:
        from graphllm.job import build
        from graphllm.plan import CompilePlan
        from graphllm.planning.task_config import TaskConfig

        plan = CompilePlan(model=model, batch_size=2 * pairs, seq_len=seq, backend=backend, seed=seed,
                           task=TaskConfig(kind="dpo", dpo_beta=beta))
        self.built = build(plan, warm=False)
        self.opt = self.built.engine.make_optimizer(TrainConfig())

    def step(self, ids: torch.Tensor, labels: torch.Tensor, sw: Stopwatch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.built.engine.forward_backward(ids, labels)  # reference + policy forward, backward
        sw.lap("fwd")  # the compiled step runs forward and backward together: all of it counts here
        sw.lap("bwd")
        self.built.engine.clip_grad_norm(1.0)
        self.opt.step()
        sw.lap("opt")
        return loss


def run(args: argparse.Namespace, console: Console) -> dict:
    from graphllm.models import load_model

    source = load_model(args.model, seed=args.seed)
    ids, labels = make_batch(source.config.vocab_size, args.pairs, args.seq, args.seed)
    sides = {}
    sides["graphllm"], prep_g = timed(lambda: Graphllm(args.model, args.pairs, args.seq, args.backend, args.beta,
                                                       args.seed))
    sides["trl-eager"], prep_t = timed(lambda: TrlEager(source, args.beta))
    times: dict[str, list[dict]] = {n: [] for n in CONTENDERS}

    def one(name: str, tag: str) -> None:
        sw = Stopwatch()
        loss = sides[name].step(ids, labels, sw)
        times[name].append({"tag": tag, "total": sw.total, **sw.laps, "loss": loss})

    console.print(f"[bold]{args.model}[/] DPO: {args.pairs} pairs × seq {args.seq} = {2 * args.pairs * args.seq} "
                  f"tokens/step, graphllm backend {args.backend}, {torch.get_num_threads()} threads; compiling …")
    for name in CONTENDERS:
        one(name, "first")
    for _ in range(args.warmup):
        for name in CONTENDERS:
            one(name, "warmup")
    for r, order in enumerate(interleave(list(CONTENDERS), args.rounds)):
        for name in order:
            for _ in range(args.steps_per_round):
                one(name, f"round{r}")
    steady = {n: [s["total"] for s in t if s["tag"].startswith("round")] for n, t in times.items()}
    med = {n: median(v) for n, v in steady.items()}
    first = {n: t[0]["loss"] for n, t in times.items()}
    second = {n: t[1]["loss"] for n, t in times.items()}
    rel = abs(second["graphllm"] - second["trl-eager"]) / abs(second["trl-eager"])
    per_round = [median([s["total"] for s in times["trl-eager"] if s["tag"] == f"round{r}"])
                 / median([s["total"] for s in times["graphllm"] if s["tag"] == f"round{r}"])
                 for r in range(args.rounds)]
    return {"model": args.model, "pairs": args.pairs, "seq": args.seq, "backend": args.backend,
            "threads": torch.get_num_threads(), "median_step_s": med, "ratio": med["trl-eager"] / med["graphllm"],
            "ratio_rounds": per_round, "first_step_s": {n: t[0]["total"] for n, t in times.items()},
            "prepare_s": {"graphllm": prep_g, "trl-eager": prep_t}, "first_loss": first, "second_loss": second,
            "second_loss_rel_diff": rel, "loss_ok": rel <= LOSS_RTOL, "inductor_cache": str(CACHE_DIR),
            "inductor_cache_warm": CACHE_WARM, "steps": steady, "command": args.command}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="a preset or HF directory (default tiny-llama)")
    p.add_argument("--pairs", type=int, default=4, help="(chosen, rejected) pairs per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"], help="graphllm's backend")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results (every step time) here")
    args = p.parse_args(argv)
    args.command = " ".join(["python benchmarks/dpo_step.py", *(sys.argv[1:] if argv is None else argv)])
    if args.warmup < 1:
        p.error("--warmup must be ≥ 1 (the loss check reads the second step)")
    console = Console(width=None if sys.stdout.isatty() else 150)
    res = run(args, console)
    m = res["median_step_s"]
    console.print(f"median step: graphllm {m['graphllm']:.3f} s, TRL-style eager {m['trl-eager']:.3f} s → "
                  f"graphllm {res['ratio']:.2f}× (per round {min(res['ratio_rounds']):.2f}–"
                  f"{max(res['ratio_rounds']):.2f}); first step (compile) graphllm "
                  f"{res['first_step_s']['graphllm']:.1f} s + build {res['prepare_s']['graphllm']:.1f} s")
    status = "[green]OK[/]" if res["loss_ok"] else "[red]MISMATCH[/]"
    console.print(f"loss: first step graphllm {res['first_loss']['graphllm']:.6f}, TRL-style "
                  f"{res['first_loss']['trl-eager']:.6f} (log 2: policy = reference); second step graphllm "
                  f"{res['second_loss']['graphllm']:.6f}, TRL-style {res['second_loss']['trl-eager']:.6f} "
                  f"(rel diff {res['second_loss_rel_diff']:.1e}, tol {LOSS_RTOL:.0e}) {status}")
    console.print(f"command: {res['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
