"""Ascend pre-flight: graphllm's graphs checked against torchair without torch_npu. `wheel` finds
torch_npu's sources (an explicit wheel or folder, `$GRAPHLLM_TORCH_NPU_WHEEL`, an installed torch_npu, or
the 2.13.0 wheel downloaded into graphllm's cache) and reads its kernel schemas; `converters` indexes
the GE converters torchair registers, parsed with `ast`; torch_npu itself is never imported (without
Ascend CANN that breaks `import torch`)."""
