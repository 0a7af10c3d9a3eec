"""Sampling and streaming pieces of graphllm.generate, against transformers' logits processors (no graphs)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from graphllm.errors import GraphllmError
from graphllm.generate import Sampler, SamplingConfig, TextStream
from graphllm.generate.sampling import apply_repetition_penalty, warp

B, V = 4, 50
# Same fp32 elementwise formula on both sides (divide or multiply by the penalty): bitwise equal.
PENALTY_ATOL = 0.0


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers() -> None:
    logits = _logits()
    ids = torch.randint(0, V, (B, 7), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = apply_repetition_penalty(logits, seen, penalty)
        torch.testing.assert_close(got, want, atol=PENALTY_ATOL, rtol=0)
        assert not torch.equal(got, logits)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.3)])
def test_top_k_top_p_keep_what_transformers_keeps(top_k: int, top_p: float) -> None:
    logits = _logits(2)
    want = logits / 0.7
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = warp(logits, SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.5, top_k=1, seed=3),
                                 SamplingConfig(temperature=1.5, top_p=1e-6, seed=3)])
def test_top_k_one_and_tiny_top_p_are_greedy(cfg: SamplingConfig) -> None:
    logits = _logits(4)
    sampled = Sampler(cfg, batch=B, vocab=V, device=torch.device("cpu"))(logits)
    assert torch.equal(sampled, logits.argmax(-1))


def test_sampling_is_reproducible_for_a_seed_and_follows_the_distribution() -> None:
    logits = _logits(5)
    draw = lambda seed: torch.stack([Sampler(SamplingConfig(seed=seed), batch=B, vocab=V,
                                             device=torch.device("cpu"))(logits) for _ in range(3)])
    assert torch.equal(draw(0), draw(0))
    # a very peaked row is sampled at its peak; a flat one is not always the argmax
    peaked = torch.full((1, V), -30.0)
    peaked[0, 7] = 30.0
    s = Sampler(SamplingConfig(seed=1), batch=1, vocab=V, device=torch.device("cpu"))
    assert all(int(s(peaked)) == 7 for _ in range(20))
    flat = Sampler(SamplingConfig(seed=1), batch=1, vocab=V, device=torch.device("cpu"))
    assert len({int(flat(torch.zeros(1, V))) for _ in range(20)}) > 1


def test_sampler_penalises_prompt_and_generated_tokens() -> None:
    s = Sampler(SamplingConfig(greedy=True, repetition_penalty=100.0), batch=1, vocab=V, device=torch.device("cpu"))
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4], logits[0, 5] = 3.0, 2.0, 1.0
    s.observe([[3]])
    assert int(s(logits)) == 4  # 3 is in the prompt
    assert int(s(logits)) == 5  # 4 was just generated


@pytest.mark.parametrize("kwargs, flag", [({"top_p": 0.0}, "--top-p"), ({"temperature": -1.0}, "--temperature"),
                                          ({"top_k": -2}, "--top-k"), ({"repetition_penalty": 0.0}, "--repetition-penalty")])
def test_bad_sampling_settings_name_the_flag(kwargs, flag: str) -> None:
    with pytest.raises(GraphllmError, match=flag):
        SamplingConfig(**kwargs)


def _bytes_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_splits_a_utf8_character() -> None:
    s = TextStream(_bytes_decode)
    pieces = [s.push(b) for b in "aé€😀".encode()]
    assert "".join(pieces) + s.finish() == "aé€😀"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "é"]  # é's first byte alone prints nothing


def test_stream_holds_back_a_possible_stop_string_and_cuts_at_it() -> None:
    s = TextStream(_bytes_decode, stop=["END"])
    out = [s.push(b) for b in b"ab E"]
    assert "".join(out) == "ab "  # "E" may start "END"
    assert s.push(ord("X")) == "EX" and not s.stopped
    out = [s.push(b) for b in b" ENDtail"]
    assert s.stopped and s.text == "ab EX " and "".join(out) == " "
    assert s.push(ord("z")) == "" and s.finish() == ""
