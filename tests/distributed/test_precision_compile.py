"""The GPU path's options, exercised on CPU: torch.compile per block and bf16 mixed precision
(fp32 master weights, bf16 compute), each against the single-device run."""

import pytest
import torch

from parity import assert_matches_single, base_args, run_against_single, variant

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


def test_compiled_blocks_match_one_device(tmp_path):
    base = base_args(tmp_path, steps=4, global_batch=8)
    rows = run_against_single(tmp_path, base, [variant(base, "ddp", 2, compile=True),
                                               variant(base, "fsdp", 2, compile=True)])
    # Inductor fuses elementwise ops differently from eager; the bound stays the fp32 one.
    assert_matches_single(rows["ddp-compiled-2"])
    assert_matches_single(rows["fsdp-compiled-2"])


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path):
    import dataclasses

    base = base_args(tmp_path, steps=4, global_batch=8)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, dtype="bfloat16"))
    rows = run_against_single(tmp_path, base, [variant(base, "ddp", 2), variant(base, "pipeline", 2,
                                                                             microbatches=2)])
    for cid in ("ddp-2", "pipeline-1f1b-m2-2"):
        row = rows[cid]
        assert row["verify_tolerance"] == 2e-2
        assert_matches_single(row, tolerance=2e-2)
        # fp32 master weights: parameter memory is 4 bytes per parameter on each replica/stage.
    assert rows["single-1"]["mem_params_bytes"] == 4 * rows["single-1"]["n_params"]
    assert rows["single-1"]["dtype"] == "bfloat16"


def test_fused_optimizer_is_chosen_on_gpus_only():
    from parallab.train.trainer import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer("adamw", p, lr=1e-3, device_type="cpu").defaults["foreach"] is True
    assert make_optimizer("adamw", p, lr=1e-3, device_type="cuda").defaults["fused"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU check script "
                    "benchmarks/gpu_check.py covers NCCL, bf16, compile and MFU on one)")
def test_cuda_memory_stats_and_nccl(tmp_path):
    base = base_args(tmp_path, steps=3, global_batch=8)
    rows = run_against_single(tmp_path, base, [])
    row = rows["single-1"]
    assert row["backend"] == "nccl" and row["mem_source"] == "cuda-max-allocated"
    assert row["cuda_reserved_bytes"] >= row["peak_mem_bytes"] > 0
