"""graphllm::linear_cross_entropy — the LM head and its cross-entropy as one op that never holds the [N, V] logits.

    loss = cross_entropy((hidden Wᵀ).float(), labels, ignore_index, reduction)      hidden [*, H], W [V, H]

The training graph ends in `lm_head → .float() → flatten → cross_entropy`: the [N, V] logits, their fp32 copy and
the softmax the backward forms are the largest tensors of a small model with a large vocabulary (small-llama,
512 tokens × 32000: 62.5 MiB each in fp32). This op computes the same loss K vocabulary chunks at a time
(`chunk_size` rows of W each; K is small and static, so a Python loop over the chunks is unrolled when traced):

    forward   z_k = hidden W_kᵀ (fp32) → per token: running max m, Σ exp(z − m) rescaled online (s), the target's
              logit t from the chunk holding it;  lse = m + log s;  loss_i = lse_i − t_i (0 where ignored)
    backward  recomputes z_k (as W_k hiddenᵀ, see below) and forms dz = exp(z − lse)·(w_i + g_lse) − w_i·[j = t_i]
              with w_i the token's share of the loss gradient (g/count for mean, 0 if ignored);
              grad_W[k] = dz_kᵀ hidden (its own rows of grad_W: no accumulation), grad_hidden += dz_k W_k.

It saves hidden, W, labels and the fp32 lse [N] (or, split over ranks, the row max and sum-exp); beyond those the
forward and backward hold one or two chunks' [N, V/K] fp32 temporaries. Matmuls run in the compute dtype (bf16 under
autocast, like the linear it replaces); lse and the softmax in fp32; the per-chunk grad_hidden partials are summed
in fp32.

Why vocabulary chunks and recomputation — the alternatives measured (benchmarks/fused_loss.py --part head:
small-llama's head, 512 tokens × 768 × 32000, fp32, inductor, CPU; peak above the weight, grad W included):
unfused 162 MiB; this op 109 MiB; token chunks recomputing in the backward 201 MiB; token chunks with the gradients
formed in the forward (Liger's choice, no recomputation) 248 MiB. With token chunks grad_W is a sum of K rank-N/K
updates of the whole [V, H] (94 MiB here): a functional graph holds the accumulator and its next value at once, and
Liger's backward multiplies the saved grad_W by the incoming gradient into a new [V, H] — one or two grad_W more,
which outweighs the logits at this shape. Vocabulary chunks write each grad_W block once (inductor writes the blocks
in place into the concatenated result) and accumulate only grad_hidden [N, H]. The price is one more [N, H]×[H, V]
matmul, the backward's recomputation: 4 instead of 3 (measured 1.14× the unfused head's time in bf16; Liger's
1.42×, which also re-reads and re-writes grad_W per chunk).

The backward recomputes the transposed logits W_k hiddenᵀ [V/K, N], not hidden W_kᵀ as the forward: the same
numbers, but a different op, so the min-cut partitioner's CSE (inductor) cannot merge the two and save the chunk's
logits — which it does for an identical recomputation (tests/test_fused_loss.py checks what the forward saves). The
layout also suits the backward: dz_kᵀ hidden is a plain matmul for grad_W's rows, and no reduction is needed. The
forward orders its chunks explicitly (`_after`): left alone, inductor computes every chunk's logits first.

Three ops:
- `linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size) -> (loss, lse)`: the
  single-process op, raised by passes/fuse_linear_cross_entropy.py. reduction is ATen's enum (0 none → per-token
  [N], 1 mean, 2 sum); lse [N] fp32 is differentiable (a z-loss pass may use it).
- `linear_cross_entropy_parts(hidden, weight, labels, vocab_start, chunk_size) -> (row_max, sum_exp, target)`:
  one rank's share under a vocabulary-parallel LM head (weight = rows [vocab_start, vocab_start + V/tp));
  passes/vocab_parallel.py combines the ranks' parts with the same all-reduces as the unfused vocab-parallel
  cross-entropy. row_max carries no gradient (the loss does not depend on it).
- `linear_cross_entropy_backward(...)`: the shared backward (eager backend: grad_W written block by block into one
  buffer). The decompositions below are what inductor and torchair trace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2  # ATen's Reduction enum (cross_entropy_loss's `reduction`)


def vocab_spans(vocab: int, chunk_size: int) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of W the op computes at a time (chunk_size ≤ 0: the whole vocabulary)."""
    step = chunk_size if 0 < chunk_size < vocab else vocab
    return [(a, min(a + step, vocab)) for a in range(0, vocab, step)]


def _targets(labels: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(labels' row in W[start:stop] or 0, whether it lies there) — an ignored label (< 0) never does."""
    inside = (labels >= start) & (labels < stop)
    return torch.where(inside, labels - start, 0), inside


def _after(*stats: Tensor) -> Tensor:
    """[N, 1] zeros computed from the running statistics (their non-finite values where there are any: such a row's
    loss is not finite anyway). Added to the hidden states the next chunk's matmul reads, it orders that matmul after
    everything the previous chunks' logits feed, so one chunk's logits are live at a time. Without it inductor runs
    every chunk's matmul first and fuses the chunks' reductions into one kernel that reads all of them — the whole
    [N, V] again (seen in its generated code); a plain `0 * m` it folds to a constant. On hidden [N, H], not on the
    logits [N, V/K] (addmm's bias): a smaller copy per chunk."""
    total = sum(stats[1:], stats[0])
    return torch.where(torch.isfinite(total), 0.0, total).unsqueeze(1)


def parts_forward(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int,
                  chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H] (rows vocab_start…), labels [N] → fp32 [N] each: the row max m of the logits,
    Σ exp(z − m), and the target's logit (0 when another rank's rows hold it)."""
    m = s = t = None
    for a, b in vocab_spans(weight.shape[0], chunk_size):
        h = hidden if m is None else hidden + _after(m, s, t).to(hidden.dtype)  # hidden + 0, ordered: see _after
        z = torch.mm(h, weight[a:b].t()).float()  # [N, b-a]
        index, inside = _targets(labels, vocab_start + a, vocab_start + b)
        picked = torch.where(inside, z.gather(1, index.unsqueeze(1)).squeeze(1), 0.0)
        top = z.max(-1)[0]  # max.dim, not amax: torchair's GE converter for aten.amax is a stub
        if m is None:
            m, s, t = top, (z - top.unsqueeze(1)).exp().sum(-1), picked
        else:
            new = torch.maximum(m, top)
            s = s * (m - new).exp() + (z - new.unsqueeze(1)).exp().sum(-1)
            m, t = new, t + picked
    return m, s, t


def parts_backward(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, chunk_size: int, shift: Tensor,
                   coef_exp: Tensor, coef_target: Tensor, need_hidden: bool, need_weight: bool,
                   grad_weight: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of hidden and weight for dL/dz_ij = coef_exp_i · exp(z_ij − shift_i) + coef_target_i · [j = t_i]
    (z = hidden Wᵀ, fp32 [N] coefficients). `grad_weight`: a buffer to write grad_W's blocks into (eager kernel);
    without it the blocks are concatenated (a traced graph: inductor writes them into the result in place)."""
    grad_h, blocks = None, []
    for a, b in vocab_spans(weight.shape[0], chunk_size):
        w_k = weight[a:b]
        z_t = torch.mm(w_k, hidden.t()).float()  # [b-a, N]: transposed, so CSE never merges it with the forward's
        g_t = (z_t - shift.unsqueeze(0)).exp() * coef_exp.unsqueeze(0)
        index, inside = _targets(labels, vocab_start + a, vocab_start + b)
        g_t = g_t.scatter_add(0, index.unsqueeze(0), torch.where(inside, coef_target, 0.0).unsqueeze(0))
        g_t = g_t.to(hidden.dtype)
        if need_weight:
            if grad_weight is not None:
                torch.mm(g_t, hidden, out=grad_weight[a:b])
            else:
                blocks.append(torch.mm(g_t, hidden))  # [b-a, H]
        if need_hidden:
            part = torch.mm(g_t.t(), w_k).float()  # [N, H]
            grad_h = part if grad_h is None else grad_h + part
    if need_weight and grad_weight is None:
        grad_weight = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return (grad_h.to(hidden.dtype) if need_hidden else None), (grad_weight if need_weight else None)


def token_losses(lse: Tensor, target: Tensor, labels: Tensor, ignore_index: int, reduction: int) -> Tensor:
    """cross_entropy's reduction of the per-token losses lse − target (0 at ignored labels)."""
    ignored = labels == ignore_index
    per_token = torch.where(ignored, 0.0, lse - target)
    if reduction == REDUCTION_NONE:
        return per_token
    total = per_token.sum()
    if reduction == REDUCTION_SUM:
        return total
    return total / (~ignored).sum()  # 0/0 = nan when every label is ignored, as F.cross_entropy


def _loss_weights(grad: Tensor, labels: Tensor, ignore_index: int, reduction: int) -> Tensor:
    """d loss / d (lse_i − target_i) per token, fp32 [N]."""
    valid = labels != ignore_index
    if reduction == REDUCTION_MEAN:
        grad = grad / valid.sum()
    return torch.where(valid, grad.float(), 0.0)


def _flat(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # [N, H], [N]


def _check(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[-1],
                 lambda: f"linear_cross_entropy: weight must be [V, {hidden.shape[-1]}], got {list(weight.shape)}")
    torch._check(labels.numel() * hidden.shape[-1] == hidden.numel(),
                 lambda: "linear_cross_entropy: one label per row of hidden")


# -- graphllm::linear_cross_entropy -----------------------------------------------------------------------------
@torch.library.custom_op("graphllm::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                         reduction: int = REDUCTION_MEAN, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    h, y = _flat(hidden, labels)
    dtype = torch.promote_types(h.dtype, weight.dtype)
    m, s, t = parts_forward(h.to(dtype), weight.to(dtype), y, 0, chunk_size)
    lse = m + s.log()
    return token_losses(lse, t, y, ignore_index, reduction), lse


@linear_cross_entropy.register_fake
def _(hidden, weight, labels, ignore_index=-100, reduction=REDUCTION_MEAN, chunk_size=0):
    _check(hidden, weight, labels)
    n = labels.numel()
    loss = hidden.new_empty((n,) if reduction == REDUCTION_NONE else (), dtype=torch.float32)
    return loss, hidden.new_empty((n,), dtype=torch.float32)


def _setup(ctx, inputs, output):
    hidden, weight, labels, ctx.ignore_index, ctx.reduction, ctx.chunk_size = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    y = labels.reshape(-1)
    if grad_loss is None:  # only lse was used
        grad_loss = lse.new_zeros(y.shape if ctx.reduction == REDUCTION_NONE else ())
    share = _loss_weights(grad_loss, y, ctx.ignore_index, ctx.reduction)
    coef_exp = share if grad_lse is None else share + grad_lse
    grads = _backward_op(hidden, weight, y, 0, ctx.chunk_size, lse, coef_exp, -share, ctx.needs_input_grad[:2])
    return (*grads, None, None, None, None)


# -- graphllm::linear_cross_entropy_parts (one rank's share under a vocabulary-parallel head) ---------------------
@torch.library.custom_op("graphllm::linear_cross_entropy_parts", mutates_args=())
def linear_cross_entropy_parts(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int,
                               chunk_size: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    h, y = _flat(hidden, labels)
    dtype = torch.promote_types(h.dtype, weight.dtype)
    return parts_forward(h.to(dtype), weight.to(dtype), y, vocab_start, chunk_size)


@linear_cross_entropy_parts.register_fake
def _(hidden, weight, labels, vocab_start, chunk_size=0):
    _check(hidden, weight, labels)
    return tuple(hidden.new_empty((labels.numel(),), dtype=torch.float32) for _ in range(3))


def _setup_parts(ctx, inputs, output):
    hidden, weight, labels, ctx.vocab_start, ctx.chunk_size = inputs
    ctx.save_for_backward(hidden, weight, labels, output[0])
    ctx.mark_non_differentiable(output[0])


def _backward_parts(ctx, _grad_max, grad_sum, grad_target):
    hidden, weight, labels, row_max = ctx.saved_tensors
    zeros = torch.zeros_like(row_max)
    grads = _backward_op(hidden, weight, labels.reshape(-1), ctx.vocab_start, ctx.chunk_size, row_max,
                         zeros if grad_sum is None else grad_sum, zeros if grad_target is None else grad_target,
                         ctx.needs_input_grad[:2])
    return (*grads, None, None, None)


# -- the shared backward ----------------------------------------------------------------------------------------
@torch.library.custom_op("graphllm::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, chunk_size: int,
                                  shift: Tensor, coef_exp: Tensor, coef_target: Tensor, need_hidden: bool,
                                  need_weight: bool) -> tuple[Tensor, Tensor]:
    """(grad_hidden [*, H] or [0], grad_weight [V, H] or [0]): an empty tensor for a gradient not asked for."""
    h, y = _flat(hidden, labels)
    dtype = torch.promote_types(h.dtype, weight.dtype)
    buffer = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    gh, gw = parts_backward(h.to(dtype), weight.to(dtype), y, vocab_start, chunk_size, shift, coef_exp, coef_target,
                            need_hidden, need_weight, buffer)
    return (gh.reshape(hidden.shape).to(hidden.dtype) if gh is not None else hidden.new_empty(0),
            gw.to(weight.dtype) if gw is not None else weight.new_empty(0))


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, labels, vocab_start, chunk_size, shift, coef_exp, coef_target, need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


def _backward_op(hidden, weight, labels, vocab_start, chunk_size, shift, coef_exp, coef_target, needs):
    # outside autocast: hidden/weight are already in the forward's compute dtype, and the fp32 coefficients must stay
    with torch.autocast(hidden.device.type, enabled=False):
        gh, gw = linear_cross_entropy_backward(hidden, weight, labels, vocab_start, chunk_size, shift.float(),
                                               coef_exp.float(), coef_target.float(), needs[0], needs[1])
    return (gh if needs[0] else None), (gw if needs[1] else None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)
linear_cross_entropy_parts.register_autograd(_backward_parts, setup_context=_setup_parts)
register_autocast_policy("graphllm::linear_cross_entropy", torch.bfloat16)  # matmuls bf16; lse fp32 (the op casts)
register_autocast_policy("graphllm::linear_cross_entropy_parts", torch.bfloat16)


# -- the decompositions (inductor's table; torchair converts the same ATen ops) ----------------------------------
class _Parts(torch.autograd.Function):
    """parts_forward / parts_backward as one autograd node, so the traced joint graph saves hidden, W, labels and
    the row max — never a chunk's logits (autograd through the loop would save every chunk's)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, chunk_size):
        row_max, sum_exp, target = parts_forward(hidden, weight, labels, vocab_start, chunk_size)
        ctx.save_for_backward(hidden, weight, labels, row_max)
        ctx.vocab_start, ctx.chunk_size = vocab_start, chunk_size
        ctx.mark_non_differentiable(row_max)
        return row_max, sum_exp, target

    @staticmethod
    def backward(ctx, _grad_max, grad_sum, grad_target):
        hidden, weight, labels, row_max = ctx.saved_tensors
        gh, gw = parts_backward(hidden, weight, labels, ctx.vocab_start, ctx.chunk_size, row_max, grad_sum,
                                grad_target, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gh, gw, None, None, None


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """What the linear it replaces computes in: autocast's dtype when autocast is on, else the inputs' dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy_parts_decomposed(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int,
                                          chunk_size: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    h, y = _flat(hidden, labels)
    dtype = _compute_dtype(hidden, weight)
    return _Parts.apply(h.to(dtype), weight.to(dtype), y, vocab_start, chunk_size)


def linear_cross_entropy_decomposed(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                    reduction: int = REDUCTION_MEAN, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """The op in plain PyTorch: its parts (one autograd node, the chunk loop inside) and the ATen combine."""
    row_max, sum_exp, target = linear_cross_entropy_parts_decomposed(hidden, weight, labels, 0, chunk_size)
    lse = row_max + sum_exp.log()
    return token_losses(lse, target, labels.reshape(-1), ignore_index, reduction), lse
