"""Process-group start-up and the one place that knows the rank: backend choice, device choice,
rank-0 logging."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets these for every worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def pick_backend(requested: str = "auto") -> str:
    """NCCL on CUDA GPUs, gloo on CPUs (a gloo group with CUDA tensors is known to crash)."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(*, backend: str = "auto", timeout_s: float = 300.0,
                     threads: int = 1) -> DistInfo:
    """Join the process group torchrun prepared (or a group of one outside torchrun)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = pick_backend(backend)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # A CPU "device" is one process with a fixed number of intra-op threads, so that N
        # devices use N cores and one rank's threads never spill onto another's cores.
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        kwargs = {"device_id": device} if backend == "nccl" else {}
        from parallab.runtime.faults import attempt_store

        store = attempt_store(timeout_s)  # after a torchrun restart: keys of this attempt only
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def worker_entry(main) -> None:
    """Run a worker's ``main`` and end the process with its return code (exit_process). A
    crash in C++ (SIGSEGV, SIGABRT) prints every Python thread's stack into the worker's log
    first (faulthandler), so that a rank killed by a signal says where it was."""
    import faulthandler

    faulthandler.enable(all_threads=True)
    exit_process(main())


def exit_process(code: int) -> None:
    """End a worker process with ``code`` once its work is done and written: flush Python's
    streams and logs, then leave without the interpreter's teardown. Under load, gloo's
    threads sometimes outlive the process group into C++ static destruction, which aborts with
    "terminate called without an active exception" after every result was written (seen in
    hand-written loops too, torch 2.13 CPU): torchrun would report a finished run as failed.
    A failing worker (``code`` != 0) exits the usual way: its slower teardown leaves torchrun
    to see a rank killed by a signal before its partners' consequent connection errors, which
    is what the failure's reason names (bench/launch.failure_reason)."""
    import logging

    if code != 0:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def free_port() -> int:
    """A free TCP port on the loopback address (single-machine runs bind there only)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_logger() -> logging.Logger:
    """parallab's logger: every rank logs warnings, only rank 0 logs progress."""
    log = logging.getLogger("parallab")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK", "0")
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO if rank == "0" else logging.WARNING)
        log.propagate = False
    return log
