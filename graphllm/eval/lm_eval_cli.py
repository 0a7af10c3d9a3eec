"""lm-evaluation-harness's command line with graphllm's model registered:

    python -m graphllm.eval.lm_eval_cli run --model graphllm \\
        --model_args model=path/to/hf_dir,backend=inductor,batch_size=8 --tasks wikitext

lm_eval finds a model name only among the modules it has imported, so `lm_eval --model graphllm` alone does not
know graphllm; this imports graphllm.eval.lm_eval_adapter (which registers "graphllm") and hands the argument
list to lm_eval's own CLI. Needs `pip install 'graphllm[lm-eval]'`.
"""

from __future__ import annotations


def main() -> None:
    try:
        import graphllm.eval.lm_eval_adapter  # noqa: F401  registers the model name "graphllm"
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise SystemExit(f"graphllm lm_eval: {exc}; install it with pip install 'graphllm[lm-eval]'") from exc
    cli_evaluate()


if __name__ == "__main__":
    main()
