"""Model families other than the built-in GPT against one device at world size 2 (gloo, real
torchrun): Hugging Face GPT-2 and Llama from a config (DDP, FSDP, pipeline, tensor
parallelism; for GPT-2, whose fused q|k|v is split by heads, also FSDP x TP at 4), a user's
module from a file (DDP, FSDP, pipeline, TP with its plan), the ResNet (DDP, pipelined and
naive split); and Hugging Face inference (replicas, pipeline, TP, GPT-2 also from a saved
folder) with greedy generation. One module-scoped launch group per model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity import assert_matches_single, base_args, run_against_single, variant

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

HERE = Path(__file__).parent
HF_REASON = "transformers is not installed (optional dependency: pip install 'parallab[hf]')"


def _group(tmp_path_factory, folder: str, variants, **model) -> dict:
    tmp = tmp_path_factory.mktemp(folder)
    base = base_args(tmp, steps=4, global_batch=8, **model)
    return run_against_single(tmp, base, [v(base) for v in variants])


DP_PP = [lambda b: variant(b, "ddp", 2), lambda b: variant(b, "fsdp", 2),
         lambda b: variant(b, "pipeline", 2, schedule="1f1b", microbatches=2)]


@pytest.fixture(scope="module")
def gpt2_rows(tmp_path_factory):
    pytest.importorskip("transformers", reason=HF_REASON)
    return _group(tmp_path_factory, "hf-gpt2", DP_PP + [lambda b: variant(b, "tp", 2),
                                                        lambda b: variant(b, "fsdp+tp", 4)],
                  name="hf-gpt2")


@pytest.fixture(scope="module")
def llama_rows(tmp_path_factory):
    pytest.importorskip("transformers", reason=HF_REASON)
    return _group(tmp_path_factory, "hf-llama", DP_PP + [lambda b: variant(b, "tp", 2)],
                  name="hf-llama")


@pytest.fixture(scope="module")
def user_rows(tmp_path_factory):
    return _group(tmp_path_factory, "user", DP_PP + [lambda b: variant(b, "tp", 2)],
                  name="user", entry=str(HERE / "user_model.py") + ":build")


@pytest.fixture(scope="module")
def resnet_rows(tmp_path_factory):
    return _group(tmp_path_factory, "resnet", [
        lambda b: variant(b, "ddp", 2),
        lambda b: variant(b, "pipeline", 2, schedule="1f1b", microbatches=2),
        lambda b: variant(b, "pipeline", 2, schedule="gpipe", microbatches=1)], name="resnet")


def _check(rows: dict, cid: str) -> None:
    row = rows[cid]
    assert_matches_single(row)
    assert len(row["losses"]) == 4
    ref = rows["single-1"]
    assert ref["verify_status"] == "reference"
    assert row["n_params"] == ref["n_params"] > 0
    assert row["flops_per_sample"] == ref["flops_per_sample"] > 0
    assert row["peak_mem_bytes"] and row["peak_mem_bytes"] > 0


@pytest.mark.parametrize("cid", ["ddp-2", "fsdp-2", "pipeline-1f1b-m2-2", "tp-2", "fsdp+tp-2x2-4"])
def test_hf_gpt2_matches_single_device(gpt2_rows, cid):
    _check(gpt2_rows, cid)


@pytest.mark.parametrize("cid", ["ddp-2", "fsdp-2", "pipeline-1f1b-m2-2", "tp-2"])
def test_hf_llama_matches_single_device(llama_rows, cid):
    _check(llama_rows, cid)


@pytest.mark.parametrize("cid", ["ddp-2", "fsdp-2", "pipeline-1f1b-m2-2", "tp-2"])
def test_user_module_matches_single_device(user_rows, cid):
    _check(user_rows, cid)
    assert user_rows[cid]["seq_len"] == 1  # its own batches: one sample per 'token'


@pytest.mark.parametrize("cid", ["ddp-2", "pipeline-1f1b-m2-2", "pipeline-naive-2"])
def test_resnet_matches_single_device(resnet_rows, cid):
    _check(resnet_rows, cid)


@pytest.fixture(scope="module")
def hf_infer(tmp_path_factory):
    pytest.importorskip("transformers", reason=HF_REASON)
    from parallab.runtime.dist import free_port

    tmp = tmp_path_factory.mktemp("hf-infer")
    out = tmp / "infer.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join([str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0",
           str(HERE / "models_infer_main.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["hf-llama/replicas", "hf-llama/pipeline", "hf-llama/tp",
                                  "hf-gpt2/replicas", "hf-gpt2/pipeline", "hf-gpt2/tp",
                                  "hf-gpt2-folder/tp"])
def test_hf_inference_matches_single_device(hf_infer, case):
    r = hf_infer[case]
    assert r["outputs_held"] > 0
    assert r["logits_rel"] <= 1e-5, r
    assert r["token_mismatch"] == 0, r
