"""Several nodes on one machine: two `parallab` processes with node ranks 0 and 1 meet at a
c10d rendezvous on 127.0.0.1 (2 nodes x 2 CPU devices), as two machines would.

The multi-node run must compute what one node computes, write its results once (node 0), and
end with a clear error within the rendezvous timeout when a node never comes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallab.bench.result import ROW_KEYS
from parallab.runtime.dist import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600  # per command; the machine may be shared and slow

# The debug model, DDP on 4 devices, SGD (it shows a wrong gradient scale that Adam hides).
TRAIN = ["--model.preset", "debug", "--parallel.strategy", "ddp", "--parallel.devices", "4",
         "--data.global-batch", "8", "--train.steps", "4", "--train.warmup-steps", "1",
         "--train.optimizer", "sgd", "--train.lr", "0.05", "--train.seed", "1234",
         "--runtime.collective-timeout-s", "120"]


def node_args(port: int, rank: int, *, timeout_s: int = 300) -> list[str]:
    return ["--runtime.nnodes", "2", "--runtime.node-rank", str(rank),
            "--runtime.rdzv-endpoint", f"127.0.0.1:{port}", "--runtime.rdzv-timeout-s", str(timeout_s)]


def start(args: list, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "parallab", *map(str, args)], stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, COLUMNS="200"))


def finish(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Wait for every process; on the deadline interrupt them (the launcher then ends its
    torchrun) and fail."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        raise


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def test_train_on_two_nodes_equals_one_node(tmp_path):
    """ddp at 4 = 2 nodes x 2 against ddp at 4 on one node: the same per-step losses; one row,
    on node 0, although the nodes do not share a run folder (the row reaches node 0 from
    rank 0 wherever it ran). Node 1 starts first: it waits for node 0's rendezvous."""
    port = free_port()
    logs = [tmp_path / "node0.out", tmp_path / "node1.out"]
    n1 = start(["train", *TRAIN, *node_args(port, 1), "--runtime.run-id", "two",
                "--runtime.out-dir", tmp_path / "disk1"], logs[1])
    time.sleep(2)
    n0 = start(["train", *TRAIN, *node_args(port, 0), "--runtime.run-id", "two",
                "--runtime.out-dir", tmp_path / "disk0"], logs[0])
    rcs = finish([n0, n1])
    text = [l.read_text(errors="replace") for l in logs]
    assert rcs == [0, 0], f"rc {rcs}\nnode 0:\n{text[0][-3000:]}\nnode 1:\n{text[1][-3000:]}"
    assert "node 1: done; node 0 writes the results" in text[1]

    (row,) = rows(tmp_path / "disk0/two/results.jsonl")  # exactly one row, on node 0
    assert not (tmp_path / "disk1/two/results.jsonl").exists()  # node 1 appended nothing
    assert (tmp_path / "disk1/two/logs/ddp-4.node1.log").exists()
    assert set(ROW_KEYS) <= set(row)
    assert row["status"] == "ok" and row["config_id"] == "ddp-4" and row["run_id"] == "two"
    assert row["nodes"] == 2 and row["devices"] == 4 and row["devices_per_node"] == 2
    assert len(row["hosts"]) == 2 and row["node_rank"] in (0, 1)
    assert row["network_interface"] and row["cpu_model"] and row["cpu_cores"]
    # Both node agents share this machine's cores: 4 processes on its cores.
    assert row["oversubscribed"] == (row["cpu_cores"] < 4)

    single = subprocess.run([sys.executable, "-m", "parallab", "train", *TRAIN, "--runtime.run-id", "one",
                             "--runtime.out-dir", tmp_path / "one"], capture_output=True, text=True,
                            cwd=ROOT, timeout=RUN_TIMEOUT_S)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    (ref,) = rows(tmp_path / "one/one/results.jsonl")
    assert ref["nodes"] == 1 and ref["hosts"] == [ref["hostname"]]
    assert rel(row["losses"], ref["losses"]) <= 1e-6, (row["losses"], ref["losses"])


def test_verify_on_two_nodes_matches_one_device(tmp_path):
    """A verify sweep on 2 nodes x 2 sharing a run folder: node 0 runs the single-device
    reference alone (node 1 skips it and waits at the next rendezvous), then ddp at 4 spans
    both nodes and its weights and losses match the reference."""
    port = free_port()
    common = ["verify", "--sweep.strategies", "ddp", "--sweep.device-counts", "4", "--sweep.modes", "train",
              "--runtime.run-id", "v", "--runtime.out-dir", tmp_path / "shared"]
    logs = [tmp_path / "node0.out", tmp_path / "node1.out"]
    n0 = start([*common, *node_args(port, 0)], logs[0])
    n1 = start([*common, *node_args(port, 1)], logs[1])
    rcs = finish([n0, n1])
    text = [l.read_text(errors="replace") for l in logs]
    assert rcs == [0, 0], f"rc {rcs}\nnode 0:\n{text[0][-3000:]}\nnode 1:\n{text[1][-3000:]}"
    assert "all 2 configurations match the single-device run" in text[0]
    got = {r["config_id"]: r for r in rows(tmp_path / "shared/v/results.jsonl")}
    assert sorted(got) == ["ddp-4", "single-1"]  # one row each: node 1 appended nothing
    assert got["single-1"]["nodes"] == 1 and got["single-1"]["verify_status"] == "reference"
    multi = got["ddp-4"]
    assert multi["nodes"] == 2 and multi["devices_per_node"] == 2
    assert multi["verify_status"] == "pass"
    assert multi["verify_max_weight_rel"] <= 1e-5 and multi["verify_max_loss_rel"] <= 1e-5
    assert (tmp_path / "shared/v/report.md").is_file()
    assert "ddp-4.node1.log" in os.listdir(tmp_path / "shared/v/logs")


def test_a_node_that_never_joins_ends_the_run_within_the_rendezvous_timeout(tmp_path):
    """Node 0 alone (its peer never starts) and node 1 alone (node 0 never starts), at once:
    each ends within the 20 s rendezvous timeout, plus start-up, with a one-line reason; node 0
    records the failure as a row."""
    alone0 = start(["train", *TRAIN, *node_args(free_port(), 0, timeout_s=20), "--runtime.run-id", "a0",
                    "--runtime.out-dir", tmp_path], tmp_path / "node0.out")
    alone1 = start(["train", *TRAIN, *node_args(free_port(), 1, timeout_s=20), "--runtime.run-id", "a1",
                    "--runtime.out-dir", tmp_path], tmp_path / "node1.out")
    t0 = time.monotonic()
    rcs = finish([alone0, alone1], timeout=400)
    elapsed = time.monotonic() - t0
    out0, out1 = ((tmp_path / f"node{i}.out").read_text(errors="replace") for i in (0, 1))
    assert rcs == [1, 1], (rcs, out0[-2000:], out1[-2000:])
    assert elapsed < 300, elapsed  # 20 s timeouts; the rest is start-up on a loaded machine
    flat0, flat1 = " ".join(out0.split()), " ".join(out1.split())
    assert "rendezvous timed out after 20 s: not every node joined" in flat0, out0[-2000:]
    assert "could not reach the rendezvous" in flat1, out1[-2000:]
    (row,) = rows(tmp_path / "a0/results.jsonl")
    assert row["status"] == "failed" and "not every node joined" in row["reason"] and row["nodes"] == 2
    assert not (tmp_path / "a1/results.jsonl").exists()


# ---------------------------------------------------------------- inference across nodes

# The debug model, small workloads: two forward batch sizes and one short generation.
INFER = ["--infer.batch-sizes", "1", "2", "--infer.prompt-len", "8", "--infer.new-tokens", "4",
         "--infer.generate-batch", "2", "--infer.requests", "1", "--infer.warmup", "0",
         "--runtime.collective-timeout-s", "120"]


def test_infer_verify_on_two_nodes_matches_one_device(tmp_path):
    """An inference verify sweep on 2 nodes x 1 sharing a run folder: node 0 runs the
    single-device reference alone, then replicas and the pipeline at 2 span both nodes; their
    logits and greedy tokens equal the reference's, and each row is written once, saying 2
    nodes of 1 device."""
    port = free_port()
    common = ["verify", "--model.preset", "debug", "--sweep.modes", "infer",
              "--sweep.infer-strategies", "replicas", "pipeline", "--sweep.device-counts", "2", *INFER,
              "--runtime.run-id", "vi", "--runtime.out-dir", tmp_path / "shared"]
    logs = [tmp_path / "node0.out", tmp_path / "node1.out"]
    n1 = start([*common, *node_args(port, 1)], logs[1])
    n0 = start([*common, *node_args(port, 0)], logs[0])
    rcs = finish([n0, n1])
    text = [l.read_text(errors="replace") for l in logs]
    assert rcs == [0, 0], f"rc {rcs}\nnode 0:\n{text[0][-3000:]}\nnode 1:\n{text[1][-3000:]}"
    assert "all 3 configurations match the single-device run" in text[0]
    got: dict[str, list[dict]] = {}
    for r in rows(tmp_path / "shared/vi/results.jsonl"):
        got.setdefault(r["config_id"], []).append(r)
    assert sorted(got) == ["infer-pipeline-m8-2", "infer-replicas-2", "infer-single-1"]
    for cid, rs in got.items():
        # forward at 2 batch sizes + generate, once each: node 1 appended nothing
        assert sorted((r["workload"], r["batch_size"]) for r in rs) == [
            ("forward", 1), ("forward", 2), ("generate", 2)], cid
        for r in rs:
            assert set(ROW_KEYS) <= set(r) and r["status"] == "ok" and r["mode"] == "infer", r["reason"]
            assert r["run_id"] == "vi" and r["samples_per_s"] > 0
            if cid == "infer-single-1":
                assert r["nodes"] == 1 and r["verify_status"] == "reference"
                continue
            assert r["nodes"] == 2 and r["devices"] == 2 and r["devices_per_node"] == 1
            assert len(r["hosts"]) == 2 and r["node_rank"] in (0, 1)
            assert r["verify_status"] == "pass"
            assert r["verify_max_logits_rel"] <= 1e-5 and r["verify_token_mismatches"] == 0
    assert "infer-replicas-2.node1.log" in os.listdir(tmp_path / "shared/vi/logs")
    assert "infer-single-1.node1.log" not in os.listdir(tmp_path / "shared/vi/logs")  # node 0 only


def test_infer_on_two_nodes_writes_its_rows_once_on_node_0(tmp_path):
    """`parallab infer` on 2 nodes x 2 (the pipeline over 4 stages), run folders not shared:
    the rows reach node 0 from rank 0 wherever it ran, and only node 0 appends them."""
    port = free_port()
    common = ["infer", "--model.preset", "debug", "--parallel.strategy", "pipeline", "--parallel.devices",
              "4", "--infer.workloads", "generate", *INFER, "--runtime.run-id", "two"]
    logs = [tmp_path / "node0.out", tmp_path / "node1.out"]
    n0 = start([*common, *node_args(port, 0), "--runtime.out-dir", tmp_path / "disk0"], logs[0])
    n1 = start([*common, *node_args(port, 1), "--runtime.out-dir", tmp_path / "disk1"], logs[1])
    rcs = finish([n0, n1])
    text = [l.read_text(errors="replace") for l in logs]
    assert rcs == [0, 0], f"rc {rcs}\nnode 0:\n{text[0][-3000:]}\nnode 1:\n{text[1][-3000:]}"
    assert "node 1: done; node 0 writes the results" in text[1]
    (row,) = rows(tmp_path / "disk0/two/results.jsonl")
    assert not (tmp_path / "disk1/two/results.jsonl").exists()
    assert (tmp_path / "disk1/two/rows/infer-pipeline-m4-4.node1.json").exists()
    assert row["status"] == "ok" and row["config_id"] == "infer-pipeline-m4-4" and row["workload"] == "generate"
    assert row["nodes"] == 2 and row["devices"] == 4 and row["devices_per_node"] == 2 and row["pp_degree"] == 4
    assert len(row["hosts"]) == 2 and row["node_rank"] in (0, 1)
    assert row["oversubscribed"] == (row["cpu_cores"] < 4)
