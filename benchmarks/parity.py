"""Print graphllm's parity errors against transformers per family and backend (the figures the tests bound).

    python benchmarks/parity.py

Relative error = max|a-b| / max|b| of the logits, then again after one identical SGD step on both models
(taken through the compiled graph's gradients). Same fixtures as tests/test_compile_parity.py.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import graphllm  # noqa: E402
from hf_parity import FAMILIES, batch, hf_model, parity_through_step, save_hf_checkpoint  # noqa: E402


def main() -> None:
    for family in FAMILIES:
        for backend in ("eager", "inductor"):
            hf = hf_model(family, "sdpa")
            with tempfile.TemporaryDirectory() as d:
                ours = graphllm.load_model(save_hf_checkpoint(hf, family, Path(d) / "ckpt"))
            ids, targets = batch()
            compiled = graphllm.compile(ours, ids, backend=backend)
            err, err_step = parity_through_step(hf, ours, compiled, ids, targets)
            print(f"{family:24s} {backend:9s} logits {err:.1e}  after one SGD step {err_step:.1e}", flush=True)


if __name__ == "__main__":
    main()
