"""StaticGenerator: batched generation on two kinds of compiled static graph and a preallocated KV cache.

- prefill graphs, one per prompt-length bucket (powers of two from `min_bucket`, capped at `max_len`),
  each compiled the first time a batch needs it;
- one decode graph for [batch, 1] tokens over the cache [layers, batch, kv_heads, max_len, head_dim],
  compiled once and reused for every token of every request.

Both go through `graphllm.compile` (capture → model passes → lowering → backend), so they get the
same fusions as the training graph. Each compile is followed by one warm-up call on dummy inputs,
timed as compile time, so the throughput figures are steady-state. Rows are right-padded; a batch
with fewer prompts than `batch_size` is filled with one-token dummy rows whose output is dropped.

With `tp > 1` (one process per rank, all running the same prompts) both graphs also get the
tensor_parallel pass and each rank's cache holds only its kv heads (graphllm/generate/tp.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.generate.sampling import Sampler, SamplingConfig

logger = logging.getLogger("graphllm.generate")


@dataclass(kw_only=True, slots=True)
class GenerationStats:
    """Token counts and seconds of one `run`, compile time excluded."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    """Tokens produced for real rows after the first (the first comes from the prefill)."""
    decode_s: float = 0.0
    compile_s: float = 0.0
    """Seconds spent compiling (and warming up) graphs during this run."""

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def bucket(n: int, *, min_bucket: int, max_len: int) -> int:
    """Static prefill length for n prompt tokens: the next power of two ≥ n (≥ min_bucket), ≤ max_len."""
    return min(max(min_bucket, 1 << max(n - 1, 0).bit_length()), max_len)


@dataclass(kw_only=True)
class _Graph:
    fn: nn.Module
    compile_s: float = 0.0
    calls: int = field(default=0)


def _drop_export_input_check(fn: nn.Module) -> None:
    """Remove torch.export's input-constraint pre-hook from the captured graph before it is compiled.

    `ep.module()` installs it; it re-flattens and checks every input in Python on every call (~0.5 ms,
    15% of a tiny model's decode step). CompiledModel already refuses inputs of other shapes, and the
    graphs here have no dynamic dimensions to constrain.
    """
    gm = getattr(getattr(fn, "_fn", None), "_orig_mod", None)
    hooks = getattr(gm, "_forward_pre_hooks", {})
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del hooks[key]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_weights(model: nn.Module, dtype: str) -> None:
    """Cast `model`'s parameters in place to `dtype` ("fp32" | "bf16"), as `model.to(...)` does: tied
    weights stay tied and the decoder's `_apply` keeps RoPE's inv_freq buffers in float32 (as transformers
    does), so the RoPE angles are those of the float32 model and only the cos/sin tables are rounded."""
    if dtype not in DTYPES:
        raise GraphllmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model.to(DTYPES[dtype])


def weights_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype every floating-point parameter of `model` shares: the compute and cache dtype."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in params}
    names = {v: k for k, v in DTYPES.items()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        got = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise GraphllmError(f"generation needs all parameters in one of {', '.join(DTYPES)}, the model has {got}: "
                            "pass dtype='fp32' or 'bf16' (`--dtype`) to cast them")
    return params[0].device, params[0].dtype


def _eager_rounding(dtype: torch.dtype):
    """Inductor rounds a fused kernel's bf16 intermediates as op-by-op PyTorch does (each op's result to
    bf16), so bf16 graphs compute what transformers' bf16 model computes; without it inductor keeps them
    in float32 and greedy ids drift from transformers' after a few tokens. A no-op for float32 graphs."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    from torch._inductor import config as inductor_config

    return inductor_config.patch(emulate_precision_casts=True)


class StaticGenerator:
    """Generation for `model` (a LlamaForCausalLM) with a fixed batch size and cache length.

    The graphs compute in the dtype of the model's parameters, and the KV cache is stored in it; `dtype`
    ("fp32" | "bf16") first casts the parameters in place (`cast_weights`). bf16 is stored bf16 weights,
    not autocast: half the bytes per token, and the norms and softmax upcast to float32 inside, as
    transformers' bf16 models do."""

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_len: int = 512, backend: str = "inductor",
                 amp: str = "fp32", min_bucket: int = 16, passes: Sequence | None = None,
                 pad_id: int = 0, tp: int = 1, dtype: str | None = None, gemv: bool | None = None) -> None:
        from graphllm.backends import get_backend
        from graphllm.models.kv_cache import DecodeStep, PrefillStep, cache_dims

        cfg = model.config
        if batch_size < 1:
            raise GraphllmError(f"--batch-size must be at least 1, got {batch_size}")
        if not 2 <= max_len <= cfg.max_position_embeddings:
            raise GraphllmError(f"--max-len must be in [2, {cfg.max_position_embeddings}] (the model's "
                                f"max_position_embeddings), got {max_len}")
        long_rope = cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope"
        if long_rope and max_len > cfg.rope_scaling["original_max_position_embeddings"]:
            # transformers switches to the long factors mid-generation and recomputes the cache; not done here
            limit = cfg.rope_scaling["original_max_position_embeddings"]
            raise GraphllmError(f"--max-len {max_len} exceeds the model's longrope original_max_position_embeddings="
                                f"{limit}; generation uses the short factors only: use --max-len {limit} or less")
        get_backend(backend)  # unknown names fail before anything is built
        if amp != "fp32":
            # bf16 autocast around the decode graph fails in Dynamo ("Attempt to trace generator") on
            # torch 2.13, and would re-cast every fp32 weight each token: bf16 is stored weights instead
            raise GraphllmError(f"generation does not autocast, got amp={amp!r}: store the weights in bf16 "
                                "instead (StaticGenerator(dtype='bf16'), `--dtype bf16`)")
        if dtype is not None:
            cast_weights(model, dtype)
        self.model = model.eval()
        self.config = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.backend = backend
        self.amp = amp
        self.passes = passes  # the fusions (None: default_passes()); the pipeline adds generation's own steps
        # decode's linears as streaming reductions (graphllm/generate/gemv.py): inductor only (op by op the
        # product would be materialised), and before tensor_parallel would look for the linears it shards
        self.gemv = backend == "inductor" and tp == 1 if gemv is None else gemv
        self.min_bucket = min(min_bucket, max_len)
        self.pad_id = pad_id
        self.device, self.dtype = weights_dtype(model)
        self.tp, self.rank, self._groups = tp, 0, None
        kv_heads, k_dim, v_dim = cache_dims(cfg)  # (Hkv, D, D); latent attention: (1, latent, RoPE key)
        if tp > 1:  # join the group; the pipeline shards the graphs, the cache holds this rank's kv heads only
            from graphllm.generate.tp import join_tp_group, local_kv_heads

            st = join_tp_group(cfg, tp, batch_size=batch_size, max_len=max_len, device=self.device.type)
            self.rank, self._groups = st.rank, st
            kv_heads = local_kv_heads(kv_heads, tp)
            self._shards: dict[str, torch.Tensor] = {}
        elif tp < 1:
            raise GraphllmError(f"--tp must be at least 1, got {tp}")
        self.full_kv_heads = cfg.num_key_value_heads
        shape = (cfg.num_hidden_layers, batch_size, kv_heads, max_len)
        self.k_cache = torch.zeros((*shape, k_dim), dtype=self.dtype, device=self.device)  # [L, B, Hkv, M, D]
        self.v_cache = torch.zeros((*shape, v_dim), dtype=self.dtype, device=self.device)
        self._prefill_step = PrefillStep(model)
        self._decode_step = DecodeStep(model)
        self._prefill: dict[int, _Graph] = {}
        self._decode: _Graph | None = None

    # -- graphs ------------------------------------------------------------------------------------
    def _compile(self, step: nn.Module, inputs: tuple[torch.Tensor, ...], what: str) -> _Graph:
        from graphllm.compile import compile as compile_model
        from graphllm.generate.gemv import decode_gemv
        from graphllm.passes.pipeline import default_passes

        passes = self.passes
        if what == "decode" and self.gemv:
            passes = [*(default_passes() if passes is None else passes), decode_gemv]

        logger.info("generate: compiling the %s graph %s (%s)", what, [list(t.shape) for t in inputs], self.backend)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.tp > 1:
                fn = self._compile_tp(type(step), inputs)
            else:
                fn = compile_model(step, inputs, backend=self.backend, amp=self.amp, passes=passes,
                                   purpose="generate")
            _drop_export_input_check(fn)
            with _eager_rounding(self.dtype):
                fn(*inputs)  # warm-up: Dynamo + the backend compile here, outside the timed calls
        return _Graph(fn=fn, compile_s=time.perf_counter() - t0)

    def _compile_tp(self, step_type: type, inputs: tuple[torch.Tensor, ...]):
        """This rank's graph of `step_type`, captured from the full weights with cache inputs at full
        size, then sharded; it is called with `inputs` (the per-rank caches) from now on."""
        from graphllm.compile import compile_pipeline, plan_for
        from graphllm.generate.tp import shallow_clone, share_shards
        from graphllm.pass_pipeline import build_pipeline
        from graphllm.planning import Layout

        cfg = self.config
        full = [torch.zeros(t.shape[:2] + (cfg.num_key_value_heads,) + t.shape[3:], dtype=t.dtype, device=t.device)
                if t is self.k_cache or t is self.v_cache else t for t in inputs]
        local = {i: list(t.shape) for i, t in enumerate(inputs) if t is self.k_cache or t is self.v_cache}
        clone = shallow_clone(self.model)
        step = step_type(clone)
        plan = plan_for(step, full, backend=self.backend, amp=self.amp, layout=Layout(tp=self.tp))
        pipeline = build_pipeline(plan, purpose="generate", passes=self.passes, cache_shapes=local)
        fn = compile_pipeline(step, tuple(full), pipeline, groups=self._groups, rank=self.rank)
        sharded = sum(r.counters.get("sharded parameters", 0) for r in fn.result.records if r.name == "tensor_parallel")
        if not sharded:
            raise GraphllmError(f"--tp {self.tp}: the tensor-parallel plan matched no parameter of "
                                f"{type(self.model).__name__}; generation with --tp needs a Llama-family model")
        fn.result.example_shapes = [tuple(t.shape) for t in inputs]  # the cache inputs are per-rank now
        share_shards(clone, self._shards)
        return fn

    def prefill_graph(self, length: int) -> _Graph:
        g = self._prefill.get(length)
        if g is None:
            ids = torch.full((self.batch_size, length), self.pad_id, dtype=torch.long, device=self.device)
            lengths = torch.ones(self.batch_size, dtype=torch.long, device=self.device)
            g = self._prefill[length] = self._compile(self._prefill_step, (ids, lengths), f"prefill[{length}]")
        return g

    def decode_graph(self) -> _Graph:
        if self._decode is None:
            ids = torch.full((self.batch_size, 1), self.pad_id, dtype=torch.long, device=self.device)
            pos = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
            self._decode = self._compile(self._decode_step, (ids, pos, self.k_cache, self.v_cache), "decode")
        return self._decode

    @property
    def compile_counts(self) -> dict[str, int]:
        """Backend compilations per graph ("decode", "prefill[64]", ...); each is 1 for static graphs."""
        out = {f"prefill[{n}]": sum(g.fn.compile_counts.values()) for n, g in sorted(self._prefill.items())}
        if self._decode is not None:
            out["decode"] = sum(self._decode.fn.compile_counts.values())
        return out

    # -- generation --------------------------------------------------------------------------------
    def max_prompt_len(self, max_new_tokens: int) -> int:
        """Longest prompt that leaves room for `max_new_tokens` in the cache."""
        return self.max_len - max_new_tokens + 1

    def run(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingConfig | None = None,
            eos_ids: Sequence[int] = (), stats: GenerationStats | None = None) -> Iterator[list[int | None]]:
        """Generate for up to `batch_size` prompts (token ids); yields, per step, each prompt's new
        token, or None once that row has finished (EOS, which is yielded first, or the length limit).
        Rows are independent, so a caller that stops a row early (a stop string) just ignores its
        later tokens; closing the iterator ends the whole batch. `stats` accumulates timings."""
        sampling = sampling or SamplingConfig(greedy=True)
        stats = stats if stats is not None else GenerationStats()
        n = len(prompts)
        if not 1 <= n <= self.batch_size:
            raise GraphllmError(f"got {n} prompts for a generator built for batch size {self.batch_size}")
        if not 1 <= max_new_tokens < self.max_len:
            raise GraphllmError(f"--max-new-tokens must be in [1, {self.max_len - 1}] for a cache of --max-len "
                                f"{self.max_len} (the model's limit is {self.config.max_position_embeddings}), "
                                f"got {max_new_tokens}")
        rows = [list(p) for p in prompts]
        limit = self.max_prompt_len(max_new_tokens)
        for i, r in enumerate(rows):
            if not r:
                raise GraphllmError(f"prompt {i} encodes to no tokens; give some text")
            if len(r) > limit:
                raise GraphllmError(f"prompt {i} has {len(r)} tokens; with --max-new-tokens {max_new_tokens} "
                                    f"the cache of --max-len {self.max_len} fits at most {limit}: raise --max-len "
                                    "or shorten the prompt")
        B, dev = self.batch_size, self.device
        rows += [[self.pad_id]] * (B - n)  # dummy rows keep the batch static
        S = bucket(max(len(r) for r in rows), min_bucket=self.min_bucket, max_len=self.max_len)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids, lengths = ids.to(dev), lengths.to(dev)

        prefill, decode = self.prefill_graph(S), self.decode_graph()
        stats.compile_s += sum(g.compile_s for g in (prefill, decode) if g.calls == 0)
        prefill.calls += 1
        decode.calls += 1
        sampler = Sampler(sampling, batch=B, vocab=self.config.vocab_size, device=dev)
        sampler.observe(rows[:n])
        eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
        return self._steps(prefill, decode, ids, lengths, n, sampler, eos, max_new_tokens, stats)

    def _sample(self, sampler: Sampler, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row; under tp, the group's first rank's choice on every rank."""
        token = sampler(logits)
        if self.tp > 1:
            from graphllm.generate.tp import broadcast_tokens

            token = broadcast_tokens(token)
        return token

    def _steps(self, prefill: _Graph, decode: _Graph, ids: torch.Tensor, lengths: torch.Tensor, n: int,
               sampler: Sampler, eos: torch.Tensor, max_new_tokens: int,
               stats: GenerationStats) -> Iterator[list[int | None]]:
        """The prefill and decode loop of `run` (a generator; graphs are compiled before it starts,
        outside any generator frame, which Dynamo refuses to trace under autocast)."""
        B, S, dev = ids.shape[0], ids.shape[1], ids.device
        with torch.no_grad():
            t0 = time.perf_counter()
            logits, k, v = prefill.fn(ids, lengths)
            self.k_cache[:, :, :, :S].copy_(k)
            self.v_cache[:, :, :, :S].copy_(v)
            token = self._sample(sampler, logits)  # [B]
            stats.prefill_s += time.perf_counter() - t0
            stats.prompt_tokens += int(lengths[:n].sum())
            pos = lengths.clone()  # [B]: where each row's next token goes
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            done[n:] = True
            produced = 1
            L, _, Hkv, M, _ = self.k_cache.shape
            while True:
                is_eos = torch.isin(token, eos)
                out = [None if done[b] else int(token[b]) for b in range(n)]
                done |= is_eos | (pos >= M) | (produced >= max_new_tokens)
                yield out
                if bool(done.all()):
                    return
                t0 = time.perf_counter()
                step_pos = pos.clamp(max=M - 1)  # finished rows keep running; their slot is irrelevant
                logits, k, v = decode.fn(token[:, None], step_pos, self.k_cache, self.v_cache)
                index = step_pos.view(1, B, 1, 1, 1)
                # the casts are no-ops: graphs compute in the cache dtype
                for cache, new in ((self.k_cache, k), (self.v_cache, v)):
                    cache.scatter_(3, index.expand(L, B, Hkv, 1, cache.shape[-1]), new.to(cache.dtype))
                token = torch.where(done, self.pad_id, self._sample(sampler, logits))
                stats.decode_s += time.perf_counter() - t0
                stats.new_tokens += int((~done[:n]).sum())
                pos = pos + 1
                produced += 1
