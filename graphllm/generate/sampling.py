"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p, after
an optional repetition penalty. The order and semantics are transformers' (RepetitionPenalty, then
Temperature, TopK, TopP warpers), so the same settings mean the same thing in both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphllm.errors import GraphllmError


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    """How the next token is chosen."""

    greedy: bool = False
    """Always the most likely token (also when temperature is 0)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling; 0 means greedy."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities sum to at least top_p (nucleus)."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the prompt or output: logit / p if positive, × p if negative."""
    seed: int | None = None
    """Seed of the sampling generator (None: nondeterministic)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GraphllmError(f"--temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise GraphllmError(f"--top-k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GraphllmError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GraphllmError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise the logits of tokens marked in `seen_BV` (bool [B, V]); as transformers' processor does
    for the token ids of each row (each distinct token once)."""
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def warp(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p: removed tokens get -inf."""
    logits_BV = logits_BV / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits_BV.shape[-1])
        kth = torch.topk(logits_BV, k, dim=-1).values[:, -1:]  # [B, 1]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - cfg.top_p  # the low tail whose total mass is ≤ 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


class Sampler:
    """Picks next tokens for a batch; keeps which tokens each row has seen (for the penalty)."""

    def __init__(self, cfg: SamplingConfig, *, batch: int, vocab: int, device: torch.device) -> None:
        self.cfg = cfg
        self.seen_BV = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.generator = torch.Generator(device=device)
        if cfg.seed is not None:
            self.generator.manual_seed(cfg.seed)
        else:
            self.generator.seed()

    def observe(self, rows: list[list[int]]) -> None:
        """Mark the prompt tokens of each row as seen."""
        for b, ids in enumerate(rows):
            if ids:
                self.seen_BV[b, torch.tensor(ids, device=self.seen_BV.device)] = True

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """Next token per row, [B] int64; also marks them seen."""
        logits_BV = apply_repetition_penalty(logits_BV.float(), self.seen_BV, self.cfg.repetition_penalty)
        if self.cfg.is_greedy:
            tokens = logits_BV.argmax(-1)
        else:
            probs = warp(logits_BV, self.cfg).softmax(-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        if self.cfg.repetition_penalty != 1.0:
            self.seen_BV.scatter_(1, tokens[:, None], True)
        return tokens
