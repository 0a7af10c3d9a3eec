"""Which test covers each allowed pair of features (docs/composability.md's "tested" cells).

Each entry names a test by its pytest node id and says what kind of check it is:
- parity: the combination trains or steps and is compared with a reference run (losses, gradients);
- compile: the combination compiles through the whole pipeline and its graphs are checked (e.g. the npu
  dry-run of every graph);
- structure: the plan or pipeline the combination builds is checked, nothing is compiled.

tests/test_composability.py checks that every named test exists (the file defines the function and, for a
parametrized id, the file holds the parameter's id) — it never runs them — and that no refused pair is listed.
A pair not listed here and not refused is "untested" in the docs. Implied pairs (sp with tp) and alternatives
(two recompute policies) are no combinations and need no entry.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["parity", "compile", "structure", "pairwise parity"]

ROW_TEST = "tests/test_composability_rows.py::test_row_trains_like_one_process[row{}]"
"""The pairs no test below covers are held by generated rows (graphllm/planning/compat_rows.py), each trained on
gloo ranks against one process: graphllm.cli.composability_doc.matrix names the row of each such pair."""
ROW_KIND: Kind = "pairwise parity"

_TRAIN = "tests/test_parallel_training.py::test_layout_trains_like_one_process"
_LORA_PAR = "tests/test_lora_parallel.py::test_lora_layout_trains_like_one_process"
_CP = "tests/test_context_parallel.py::test_cp_trains_like_one_process"
_NPU_LAYOUTS = "tests/test_preflight_coverage.py::test_default_graphs_pass_for_each_layout"
_NPU_SP_MC2 = f"{_NPU_LAYOUTS}[tp2-sp-mc2-bf16-selective]"
_NPU_VPP = f"{_NPU_LAYOUTS}[tp2-pp2-vpp2]"
_NPU_COC = f"{_NPU_LAYOUTS}[tp2-coc-dp2-zero1]"
_MC2_BF16 = "tests/test_npu_emulation_mc2.py::test_mc2_under_bf16_autocast_trains_like_the_coc_path"
_OFFLOAD = "tests/test_activation_offload.py::test_offload_is_bitwise_equal"

COVERED: dict[tuple[str, str], tuple[str, Kind]] = {
    # layouts with each other
    ("tp", "pp"): (f"{_TRAIN}[tp2xpp2]", "parity"),
    ("tp", "dp"): (f"{_TRAIN}[tp2xdp2]", "parity"),
    ("tp", "cp"): (f"{_CP}[ring-cp2xtp2-sp]", "parity"),
    ("tp", "vpp"): (_NPU_VPP, "compile"),
    ("tp", "zero1"): ("tests/test_parallel_report.py::test_report_memory_matches_tensors_tp2_dp2_zero1", "compile"),
    ("sp", "cp"): (f"{_CP}[ring-cp2xtp2-sp]", "parity"),
    ("sp", "pp"): ("tests/test_pass_pipeline.py::test_tp2_pp2_sp_recompute", "structure"),
    ("pp", "cp"): (f"{_CP}[ring-cp2xpp2]", "parity"),
    ("dp", "cp"): ("tests/test_context_parallel_layout.py::test_dp_grad_reduce_averages_over_dp_cp", "structure"),
    ("pp", "zero1"): ("tests/test_parallel_training.py::test_resume_in_another_layout_continues_the_same_run",
                      "parity"),
    # recompute
    ("recompute-full", "cp"): (f"{_CP}[ring-cp2-recompute-full]", "parity"),
    ("recompute-full", "pp"): ("tests/test_pass_pipeline.py::test_tp2_pp2_sp_recompute", "structure"),
    ("recompute-full", "tp"): ("tests/test_pass_pipeline.py::test_tp2_pp2_sp_recompute", "structure"),
    ("recompute-full", "sp"): ("tests/test_pass_pipeline.py::test_tp2_pp2_sp_recompute", "structure"),
    ("recompute-full", "lora"): ("tests/test_lora_parallel.py::test_recompute_full_equals_lora_alone_bitwise",
                                 "parity"),
    ("recompute-full", "inductor"): ("tests/test_recompute.py::test_inductor_tags_decomposed_ops", "parity"),
    ("recompute-full", "npu"): ("tests/test_backends.py::test_every_backend_recomputes_under_full[npu]", "compile"),
    ("recompute-selective", "inductor"): ("tests/test_recompute.py::test_inductor_tags_decomposed_ops", "parity"),
    ("recompute-selective", "tp"): (_NPU_SP_MC2, "compile"),
    ("recompute-selective", "sp"): (_NPU_SP_MC2, "compile"),
    ("recompute-selective", "mc2"): (_NPU_SP_MC2, "compile"),
    ("recompute-selective", "amp-bf16"): (_NPU_SP_MC2, "compile"),
    ("recompute-selective", "npu"): (_NPU_SP_MC2, "compile"),
    ("recompute-budget", "fused-loss"): (
        "tests/test_fused_loss.py::test_compiled_step_with_the_pass_equals_it_disabled[eager-budget]", "parity"),
    # tensor-parallel overlap
    ("coc", "sp"): ("tests/test_coc.py::test_chunked_equals_unchunked", "parity"),
    ("coc", "mc2"): ("tests/test_mc2.py::test_mc2_equals_unfused[sp-chunks2-lowered]", "parity"),
    ("coc", "dp"): (_NPU_COC, "compile"),
    ("coc", "zero1"): (_NPU_COC, "compile"),
    ("coc", "npu"): (_NPU_COC, "compile"),
    ("mc2", "sp"): ("tests/test_mc2.py::test_mc2_equals_unfused[sp-eager]", "parity"),
    ("mc2", "amp-bf16"): (_MC2_BF16, "parity"),
    ("mc2", "npu"): (_MC2_BF16, "parity"),
    # layouts on the npu lowering (dry-run) and inductor
    ("tp", "npu"): (_NPU_SP_MC2, "compile"),
    ("sp", "npu"): (_NPU_SP_MC2, "compile"),
    ("pp", "npu"): (_NPU_VPP, "compile"),
    ("vpp", "npu"): (_NPU_VPP, "compile"),
    ("dp", "npu"): (_NPU_COC, "compile"),
    ("zero1", "npu"): (_NPU_COC, "compile"),
    ("cp", "npu"): ("tests/test_cp_npu.py::test_cp2_npu_emulated_matches_eager", "parity"),
    ("cp", "amp-bf16"): (f"{_NPU_LAYOUTS}[cp2-ring-bf16]", "compile"),
    ("tp", "inductor"): ("tests/test_tensor_parallel.py::test_inductor_lowers_to_c10d_functional_collectives",
                         "compile"),
    ("sp", "inductor"): ("tests/test_tensor_parallel.py::test_inductor_lowers_to_c10d_functional_collectives",
                         "compile"),
    ("tp", "amp-bf16"): (_NPU_SP_MC2, "compile"),
    ("sp", "amp-bf16"): (_NPU_SP_MC2, "compile"),
    ("pp", "amp-bf16"): ("tests/test_parallel_training.py::test_pipeline_under_bf16_autocast_trains_like_one_process",
                         "parity"),
    ("cp", "eod-reset"): (f"{_CP}[ring-cp2-packed]", "parity"),
    # adapters
    ("lora", "tp"): (f"{_LORA_PAR}[tp2]", "parity"),
    ("lora", "pp"): (f"{_LORA_PAR}[pp2]", "parity"),
    ("lora", "sp"): (f"{_LORA_PAR}[tp2-sp]", "parity"),
    ("lora", "zero1"): (f"{_LORA_PAR}[zero1-dp2]", "parity"),
    ("lora", "dp"): (f"{_LORA_PAR}[zero1-dp2]", "parity"),
    ("lora", "task-dpo"): ("tests/test_dpo.py::test_lora_reference_is_the_base_model", "parity"),
    ("lora", "fused-loss"): (f"{_OFFLOAD}[all-full]", "compile"),
    ("qlora", "task-dpo"): ("tests/test_dpo.py::test_qlora_reference_reads_the_policys_nf4_base", "parity"),
    ("qlora", "inductor"): ("tests/test_qlora.py::test_dequantised_weights_are_recomputed_not_saved[inductor-fp32]",
                            "compile"),
    ("qlora", "amp-bf16"): ("tests/test_qlora.py::test_dequantised_weights_are_recomputed_not_saved[eager-bf16]",
                            "compile"),
    # tasks
    ("task-dpo", "dp"): ("tests/test_dpo.py::test_data_parallel_dpo_equals_one_process", "parity"),
    # fused loss
    ("fused-loss", "tp"): ("tests/test_fused_loss.py::test_tp2_matches_one_process", "parity"),
    ("fused-loss", "inductor"): ("tests/test_fused_loss.py::test_inductor_saves_no_chunk_logits_and_matches",
                                 "parity"),
    ("fused-loss", "npu"): (
        "tests/test_fused_loss.py::test_compiled_step_with_the_pass_equals_it_disabled[npu-emulated-none]", "parity"),
    # memory features
    # tests/test_activation_offload.py: every run has LoRA, the fused loss and bf16 autocast; offload is compared
    # with the same plan without it (parity), the other pairs only run together there (compile)
    ("offload-activations", "recompute-selective"): (f"{_OFFLOAD}[attention-first2-prefetch0-selective]", "parity"),
    ("offload-activations", "recompute-full"): (f"{_OFFLOAD}[all-full]", "parity"),
    ("offload-activations", "lora"): (f"{_OFFLOAD}[all-full]", "parity"),
    ("offload-activations", "fused-loss"): (f"{_OFFLOAD}[all-full]", "parity"),
    ("offload-activations", "amp-bf16"): (f"{_OFFLOAD}[all-full]", "parity"),
    ("lora", "amp-bf16"): (f"{_OFFLOAD}[all-full]", "compile"),
    ("lora", "recompute-selective"): (f"{_OFFLOAD}[attention-first2-prefetch0-selective]", "compile"),
    ("fused-loss", "amp-bf16"): (f"{_OFFLOAD}[all-full]", "compile"),
    ("fused-loss", "recompute-full"): (f"{_OFFLOAD}[all-full]", "compile"),
    ("fused-loss", "recompute-selective"): (f"{_OFFLOAD}[attention-first2-prefetch0-selective]", "compile"),
    ("amp-bf16", "recompute-full"): (f"{_OFFLOAD}[all-full]", "compile"),
    ("params-bf16", "zero1"): ("tests/test_master_weights.py::test_zero1_o2_dp2_matches_one_process", "parity"),
    ("offload-optimizer", "zero1"): ("tests/test_optimizer_offload.py::test_zero1_offload_dp2_is_the_one_process_step",
                                     "parity"),
    ("offload-optimizer", "dp"): ("tests/test_optimizer_offload.py::test_zero1_offload_dp2_is_the_one_process_step",
                                  "parity"),
    ("params-bf16", "dp"): ("tests/test_master_weights.py::test_zero1_o2_dp2_matches_one_process", "parity"),
    ("params-bf16", "offload-optimizer"): (
        "tests/test_optimizer_offload.py::test_offloaded_tiny_llama_trains_like_resident_and_round_trips", "parity"),
}
"""(feature, feature) → (pytest node id, kind of check)."""
