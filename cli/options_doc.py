"""docs/options.md, generated from the option declarations: `python -m graphllm.cli.options_doc > docs/options.md`.

tests/test_options.py fails when the file is out of date, so the documented flags are the flags."""

from __future__ import annotations

HEADER = """# Options

Generated from the declarations (`graphllm/options.py`; `python -m graphllm.cli.options_doc > docs/options.md`):
each option is declared once, on its config field, and the flags, plan.json's schema, the checks and this page
come from that declaration. `graphllm compile --help` and `graphllm run --help` print the same with defaults.
"""


def render() -> str:
    from graphllm.options import markdown_table
    from graphllm.plan import CompilePlan
    from graphllm.run_config import RunConfig

    return "\n".join([
        HEADER,
        "## `graphllm compile` (graphllm.plan.CompilePlan)",
        "",
        "`--out DIR` (required, here or in the job file): the artifact directory to write. `--config FILE`: a TOML or "
        "YAML job file whose `[compile]` section sets any of these flags (docs/config_files.md). `--dry-run` (with `--backend npu`, no NPU needed): "
        "build every graph with torch_npu's kernels emulated on CPU and check each op against torchair "
        "(docs/ascend.md); `--torch-npu-wheel PATH`: the torch_npu wheel or unpacked folder it reads.",
        "",
        markdown_table(CompilePlan),
        "## `graphllm run ARTIFACT` (graphllm.RunConfig, graphllm.TrainConfig)",
        "",
        "`--nproc N`: local ranks to start (default: the plan's tp × pp × dp). `--no-progress`: plain log lines (automatic when stderr is not a terminal). "
        "`--config FILE`: a job file whose `[run]` section sets any of these flags (docs/config_files.md).",
        "",
        markdown_table(RunConfig),
    ])


if __name__ == "__main__":
    print(render(), end="")
