"""A rank's memory over the phases of one optimizer step: the peak is the largest phase, not the sum of every term.

Terms that never coexist are not added: zero_grad(set_to_none) frees the gradients between steps, the backward
frees saved activations while it makes gradients, and the optimizer step runs after the activations are gone.
Per rank (bytes; P parameters, G gradients, S optimizer states on the device, all from
graphllm.planning.optimizer_memory.optimizer_bytes, the one rule the compile report uses too):

- steady (between steps): P + S;
- forward: steady + the in-flight saved activations (+ G when an earlier micro-batch of the step made gradients);
- backward: steady + max(activations + G_prev, G) + the largest single tensor it makes: a gradient (an op's output
  before it is accumulated into `.grad`) or another (an unfused loss's logits gradient: measure.Part.transient);
- optimizer: steady + G + the step's temporaries (`optimizer_step_bytes`); ZeRO-1 (graphllm.parallel.optim
  ZeroAdamW) also holds its updated range (P/dp) and the all-gather's output (P), plus `DeviceSpec.gather_copies`
  more P-sized copies the collective library makes (gloo: one).
"""

from __future__ import annotations

from graphllm.planning.optimizer_memory import optimizer_bytes

PHASES = ("steady", "forward", "backward", "optimizer")


def rank_memory(params: float, largest_param: float, acts: float, buffers: float, layout, *, params_dtype: str,
                offload: bool, gather_copies: int, accumulates: bool, transient: float = 0.0) -> dict:
    """The memory terms of one rank and its peak (`total`) with the phase it falls in (`phase`, one of PHASES);
    `optimizer_step`: what the optimizer step adds beyond the gradients.

    `params`: elements on the rank; `largest_param`: elements of its largest parameter; `acts`: saved-activation
    bytes in flight at the forward's end; `buffers`: communication and pipeline buffers (held through the
    forward/backward); `accumulates`: the step runs several micro-batches into the same gradients; `transient`: the
    largest other tensor the backward makes (measure.Part.transient)."""
    ob = optimizer_bytes(int(params), params_dtype, zero1=layout.zero1, dp=layout.dp, offload=offload)
    p, g, s = ob["parameter_bytes"], ob["gradient_bytes"], ob["optimizer_device_bytes"]
    g_max = max(optimizer_bytes(int(largest_param), params_dtype)["gradient_bytes"], transient)
    g_prev = g if accumulates else 0
    step_tmp = ob["optimizer_step_bytes"]
    if layout.zero1:
        gather = ob["parameter_gather_bytes"]
        step_tmp += -(-gather // layout.dp) + gather * (1 + gather_copies)
    steady = p + s
    phases = {"steady": steady, "forward": steady + acts + buffers + g_prev,
              "backward": steady + max(acts + g_prev, g) + buffers + g_max, "optimizer": steady + g + step_tmp}
    phase = max(PHASES, key=lambda k: phases[k])
    return {"parameters": int(p), "gradients": int(g), "optimizer": int(s), "activations": int(acts),
            "buffers": int(buffers), "optimizer_step": int(step_tmp), "total": int(phases[phase]), "phase": phase}
