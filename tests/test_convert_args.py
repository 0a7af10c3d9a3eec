"""`graphllm convert-args`: Megatron-LM / MindSpeed-LLM launch scripts → graphllm commands or a job file.

- the script is read, never run: command substitutions, backticks and other commands create no file;
- bash expansion as the script would do it (assignments, ${X:-d}, $((a*b)), quoting, multi-line strings);
- each mapped flag lands on the graphllm option of the same meaning (global batch → micro-batches over dp,
  --min-lr → a ratio, a warmup fraction → steps, Megatron's defaults written out), the rest is listed with why;
- the printed commands and the TOML file are read back by graphllm's own parsers into the same plan and run.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from graphllm.cli.convert_args_cmd import render_commands, render_toml
from graphllm.cli.main import build_parser, command_parser, main
from graphllm.errors import GraphllmError
from graphllm.job_config import apply_config
from graphllm.launch_script import read_script
from graphllm.megatron_flags import NO_EQUIVALENT, NOT_SUPPORTED, NOT_UNDERSTOOD, translate
from graphllm.options import build, from_flags
from graphllm.plan import CompilePlan
from graphllm.run_config import RunConfig

MINDSPEED = r"""#!/bin/bash
export CUDA_DEVICE_MAX_CONNECTIONS=1
source /usr/local/Ascend/ascend-toolkit/set_env.sh   # Ascend: --backend npu
GPUS_PER_NODE=8
NNODES=${NNODES:-1}
WORLD_SIZE=$(($GPUS_PER_NODE * $NNODES))
CKPT_SAVE_DIR="./ckpt/llama 2"            # one word: quoted where it is used
TOKENIZER_PATH=./model_from_hf/llama-2-7b-hf/
TP=2; PP=2
DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES --node_rank 0 --master_addr localhost --master_port 6000
"
GPT_ARGS="
    --tensor-model-parallel-size ${TP} --pipeline-model-parallel-size ${PP} \
    --num-layers-per-virtual-pipeline-stage 4 --num-layers 32 --hidden-size 4096 \
    --sequence-parallel --use-distributed-optimizer --use-mc2 --use-flash-attn \
    --context-parallel-size 1 --context-parallel-algo megatron_cp_algo \
    --tokenizer-name-or-path ${TOKENIZER_PATH} --seq-length 4096 \
    --micro-batch-size 1 --global-batch-size 64 \
    --lr 1.0e-4 --min-lr 1.0e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01 --train-iters 2000 \
    --weight-decay 1e-1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    --recompute-granularity full --recompute-method block --recompute-num-layers 2 \
    --no-load-optim --no-load-rng --coc-mode 1 --use-ascend-coc --coc-parallel-num 2
"
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $GPT_ARGS \
    --data-path ./dataset/enwiki_text_document --split 949,50,1 \
    --log-interval 1 --save-interval 500 --eval-interval 500 --eval-iters 10 \
    --save "$CKPT_SAVE_DIR" --load ./model_weights/llama-2-7b-legacy/ \
    --distributed-backend nccl 2>&1 | tee logs/train.log
"""


def _job(tmp_path: Path, text: str, name: str = "train.sh"):
    path = tmp_path / name
    path.write_text(text)
    return translate(read_script(path))


def _skipped(job) -> dict[str, str]:
    return {s.flag.split()[0]: s.kind for s in job.untranslated}


def test_a_mindspeed_script_becomes_graphllm_options(tmp_path: Path) -> None:
    job = _job(tmp_path, MINDSPEED)
    assert job.compile == {
        ("model",): "./model_from_hf/llama-2-7b-hf/", ("backend",): "npu", ("amp",): "bf16", ("seed",): 1234,
        ("batch_size",): 1, ("seq_len",): 4096, ("layout", "tp"): 2, ("layout", "pp"): 2, ("layout", "cp"): 1,
        ("layout", "cp_algo"): "ring", ("layout", "sequence_parallel"): True, ("layout", "zero1"): True,
        ("layout", "mc2"): True, ("layout", "dp"): 2, ("layout", "micro_batches"): 32, ("layout", "vpp"): 4,
        ("layout", "coc_parallel_num"): 2, ("recompute", "policy"): "full", ("recompute", "method"): "block",
        ("recompute", "layers"): 2}
    run = job.run
    assert (run[("train", "lr")], run[("train", "min_lr_ratio")], run[("train", "warmup_steps")]) == (1e-4, 0.1, 20)
    assert (run[("train", "steps")], run[("train", "seed")], run[("train", "weight_decay")]) == (2000, 1234, 0.1)
    assert run[("data",)] == ["./dataset/enwiki_text_document"] and run[("split",)] == "949,50,1"
    assert run[("save",)] == "./ckpt/llama 2" and run[("eval_iters",)] == 10
    assert _skipped(job) == {"--coc-mode": NOT_SUPPORTED}
    converted = run[("load",)]  # the Megatron checkpoint, converted first (docs/megatron.md)
    assert converted.endswith("_graphllm") and any("megatron-to-graphllm --megatron" in n and converted in n
                                                   for n in job.notes)
    assert job.from_model == ["--num-layers 32", "--hidden-size 4096"]
    assert {flag for flag, _ in job.no_flag} == {"--use-flash-attn", "--no-load-optim", "--no-load-rng",
                                                  "--distributed-backend nccl"}
    assert job.script.unexpanded == [] and job.script.variables["WORLD_SIZE"] == "8"


MEGATRON_GPU = """
python pretrain_gpt.py --tensor-model-parallel-size 1 --sequence-parallel --micro-batch-size 4 \\
    --global-batch-size 8 --lr 3e-4 --train-iters 100 --fp16 --reset-position-ids --reset-attention-mask \\
    --data-path 0.3 /d/a_text_document 0.7 /d/b_text_document --split 100,0,0 --hidden-dropout 0.1 \\
    --recompute-activations --recompute-norm --save /ckpt --load /ckpt --some-new-flag 3
"""


def test_megatron_defaults_and_semantics_that_differ(tmp_path: Path) -> None:
    job = _job(tmp_path, MEGATRON_GPU)
    assert job.compile[("device",)] == "cuda" and ("layout", "sequence_parallel") not in job.compile  # off at tp 1
    assert job.compile[("layout", "micro_batches")] == 2 and ("layout", "dp") not in job.compile  # python: 1 rank
    assert job.compile[("eod_reset",)] and job.run[("reset_position_ids",)] and job.run[("reset_attention_mask",)]
    assert (job.compile[("recompute", "policy")], job.compile[("recompute", "ops")]) == ("selective",
                                                                                         ["attention", "norm"])
    # Megatron's defaults, not graphllm's: linear decay to 0 without warmup, wd 0.01, β2 0.999; no eval (no valid split)
    run = job.run
    assert (run[("train", "lr_decay_style")], run[("train", "min_lr_ratio")], run[("train", "warmup_steps")]) == (
        "linear", 0.0, 0)
    assert (run[("train", "weight_decay")], run[("train", "beta2")]) == (0.01, 0.999) and ("eval_interval",) not in run
    assert run[("data",)] == ["0.3", "/d/a_text_document", "0.7", "/d/b_text_document"]
    assert _skipped(job) == {"--fp16": NOT_SUPPORTED, "--hidden-dropout": NOT_SUPPORTED,
                             "--some-new-flag": NO_EQUIVALENT}
    assert any("--load is --save" in n for n in job.notes)


@pytest.mark.parametrize("line, flag, kind", [
    ("torchrun --nproc_per_node $GPUS x_train.py --global-batch-size 8", "--global-batch-size", NOT_UNDERSTOOD),
    ("torchrun --nproc_per_node 4 pretrain.py --micro-batch-size 3 --global-batch-size 8", "--global-batch-size",
     NOT_UNDERSTOOD),
    ("python pretrain.py --lr-decay-style WSD", "--lr-decay-style", NOT_SUPPORTED),
    ("python pretrain.py --context-parallel-algo adaptive_cp_algo", "--context-parallel-algo", NOT_SUPPORTED),
    ("python pretrain.py --lr-decay-iters 50 --train-iters 100", "--lr-decay-iters", NOT_SUPPORTED),
    ("python pretrain.py --tensor-model-parallel-size two", "--tensor-model-parallel-size", NOT_UNDERSTOOD),
    ("python pretrain.py --data-path a --is-instruction-dataset", "--data-path", NOT_SUPPORTED),
    ("python pretrain.py --num-layers 30 --pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 2",
     "--num-layers-per-virtual-pipeline-stage", NOT_UNDERSTOOD),
])
def test_flags_that_cannot_be_translated_say_why(tmp_path: Path, line: str, flag: str, kind: str) -> None:
    assert _skipped(_job(tmp_path, line + "\n")).get(flag) == kind


def test_several_nodes_get_the_torchrun_line_for_each_node(tmp_path: Path) -> None:
    job = _job(tmp_path, "NNODES=2\npython -m torch.distributed.launch --nproc_per_node 8 --nnodes $NNODES "
                         "--master_addr node0 pretrain_gpt.py --tensor-model-parallel-size 4\n")
    assert job.compile[("layout", "dp")] == 4
    text = render_commands(job, "build/x")
    assert "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 -m graphllm " \
           "compile \\\n    --model HF_MODEL_DIR" in text


def test_bash_expansion_without_running_anything(tmp_path: Path) -> None:
    marks = [tmp_path / f"ran_{i}" for i in range(5)]
    script = f"""
A=$(touch {marks[0]})
B=`touch {marks[1]}`
touch {marks[2]}; rm -rf {tmp_path}/nothing && touch {marks[2]}
SEQ=${{SEQ_LEN:-512}}
HALF=$(( SEQ / 2 ))
LIT='$SEQ'
export TP=2 PP=1
MBS=4 echo not kept
torchrun --nproc_per_node=$((TP * 2)) pretrain_gpt.py --seq-length $HALF --tensor-model-parallel-size "$TP" \\
    --save "/ckpt/$(touch {marks[3]})" --tensorboard-dir $LIT --micro-batch-size $MBS `touch {marks[4]}`; touch {marks[2]}
"""
    (tmp_path / "evil.sh").write_text(script)
    assert main(["convert-args", str(tmp_path / "evil.sh"), "--out", str(tmp_path / "out.sh")]) == 0
    assert not any(m.exists() for m in marks)
    job = translate(read_script(tmp_path / "evil.sh"))
    assert not any(m.exists() for m in marks)
    assert (job.compile[("seq_len",)], job.compile[("layout", "tp")], job.compile[("layout", "dp")]) == (256, 2, 2)
    assert job.run[("tensorboard",)] == "$SEQ"  # single quotes expand nothing
    assert _skipped(job) == {"--save": NOT_UNDERSTOOD, "--micro-batch-size": NOT_UNDERSTOOD}
    assert job.script.unexpanded == [f"$(touch {marks[0]})", f"`touch {marks[1]}`", f"$(touch {marks[3]})", "$MBS",
                                     f"`touch {marks[4]}`"]
    text = (tmp_path / "out.sh").read_text()
    assert f"left unexpanded (not set in the script; nothing in it was run): $(touch {marks[0]})" in text


def _reparse(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_config(command_parser(parser, args.command), args)
    return args


def test_the_output_is_read_back_by_graphllms_parsers(tmp_path: Path) -> None:
    job = _job(tmp_path, MINDSPEED)
    plan, run = build(CompilePlan, job.compile), build(RunConfig, job.run)
    text = render_commands(job, "build/x")
    assert "\x1b[" not in text and "[/" not in text  # plain text, whatever the terminal
    commands = [shlex.split(line) for line in text.replace("\\\n", " ").splitlines() if line[:1] not in ("", "#")]
    assert [c[:2] for c in commands] == [["graphllm", "compile"], ["graphllm", "run"]]
    compile_argv, run_argv = commands[0][2:], commands[1][1:]
    assert compile_argv[-2:] == ["--out", "build/x"]
    assert from_flags(CompilePlan, _reparse(["compile", *compile_argv])) == plan
    assert from_flags(RunConfig, _reparse(run_argv)) == run and run_argv[1] == "build/x"
    job_file = tmp_path / "job.toml"
    job_file.write_text(render_toml(job, "build/x", job_file))
    assert tomllib.loads(job_file.read_text())["compile"]["out"] == "build/x"
    assert from_flags(CompilePlan, _reparse(["compile", "--config", str(job_file)])) == plan
    assert from_flags(RunConfig, _reparse(["run", "build/x", "--config", str(job_file)])) == run


def test_cli_output_file_and_errors(tmp_path: Path, capsys) -> None:
    script = tmp_path / "train.sh"
    script.write_text(MINDSPEED)
    out = tmp_path / "job.toml"
    assert main(["convert-args", str(script), "--format", "toml", "--out", str(out)]) == 0
    assert "# not translated (1):" in out.read_text()
    assert main(["convert-args", str(script), "--out", str(out)]) == 2  # no overwrite without --force
    assert main(["convert-args", str(script), "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith("# graphllm commands for train.sh")
    capsys.readouterr()
    assert main(["convert-args", str(script)]) == 0
    assert capsys.readouterr().out == out.read_text()
    (tmp_path / "none.sh").write_text("echo torchrun pretrain_gpt.py\nmkdir -p logs\n")
    with pytest.raises(GraphllmError, match="no launch command found"):
        read_script(tmp_path / "none.sh")
    assert main(["convert-args", str(tmp_path / "missing.sh")]) == 2
