"""Faults, made and explained.

* Test hooks (environment variables, unset in normal runs) that kill or stall one rank, so the
  recovery paths can be tested: ``PARALLAB_TEST_KILL_AT_STEP`` / ``_KILL_RANK`` /
  ``_KILL_ATTEMPTS`` (SIGKILL before that step index, on the first N attempts: torchrun counts
  them in ``TORCHELASTIC_RESTART_COUNT``), ``PARALLAB_TEST_HANG_AT_STEP`` / ``_HANG_RANK`` /
  ``_HANG_S`` (sleep before that step, on the first attempt).
* A progress board: each rank posts where it is (step, phase) to the rendezvous store, so that
  a collective that times out names the operation and the ranks it waited for. gloo's own
  message ("Timed out waiting 300000ms for recv operation to complete") names neither.
* torchrun's failure summary read back: which rank failed first, and how.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time

KILL_AT, KILL_RANK, KILL_ATTEMPTS = ("PARALLAB_TEST_KILL_AT_STEP", "PARALLAB_TEST_KILL_RANK",
                                     "PARALLAB_TEST_KILL_ATTEMPTS")
HANG_AT, HANG_RANK, HANG_S = "PARALLAB_TEST_HANG_AT_STEP", "PARALLAB_TEST_HANG_RANK", "PARALLAB_TEST_HANG_S"


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_store(timeout_s: float):
    """After a torchrun restart, the rendezvous store under a prefix of this attempt (None on
    the first). torchrun's static rendezvous (--master-addr/--master-port) keeps one store
    across restarts, so a new process group would otherwise read the dead workers' addresses
    (observed: "Gloo connectFullMesh failed ... Connection refused", or a hang)."""
    n = restart_count()
    # Only where torchrun's agent hosts the store (it outlives the workers); otherwise rank 0
    # creates a fresh one in init_process_group and there is nothing stale to avoid.
    if n == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" \
            or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"parallab/attempt-{n}/", store)


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def inject(step: int, rank: int) -> None:
    """The test hooks: called by every rank before step index ``step``."""
    if (_env_int(KILL_AT) == step and _env_int(KILL_RANK, 0) == rank
            and restart_count() < _env_int(KILL_ATTEMPTS, 1)):
        print(f"[rank {rank}] test hook {KILL_AT}={step}: killing this rank (SIGKILL)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if _env_int(HANG_AT) == step and _env_int(HANG_RANK, 0) == rank and restart_count() == 0:
        print(f"[rank {rank}] test hook {HANG_AT}={step}: stalling before the step's collectives",
              file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get(HANG_S) or 3600))


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than runtime.collective_timeout_s."""


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def step_collectives(dims, pipelined: bool) -> str:
    """What a training step of this layout communicates (for the timeout message)."""
    ops = []
    if dims.pp > 1:
        ops.append("pipeline send/recv between stages")
    if dims.tp > 1:
        ops.append("tensor-parallel all-reduce/all-gather")
    if dims.dp_shard > 1:
        ops.append("FSDP all-gather/reduce-scatter")
    if dims.dp_replicate > 1:
        ops.append("gradient all-reduce after the pipeline step" if pipelined
                   else "DDP gradient all-reduce in backward")
    return ", ".join(ops) or "no collective"


class ProgressBoard:
    """Where every rank is, in the rendezvous store (torchrun's agent keeps it, so it outlives
    a stalled or dead worker). One small write per phase; read only after a timeout."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, *, describe=None):
        self.rank, self.world, self.timeout_s = rank, world_size, timeout_s
        self.describe = describe or (lambda phase: phase)
        self.seq, self.phase = 0, "start"
        self.prefix = f"parallab/progress/{restart_count()}/"
        self.store = None
        if world_size > 1:
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                self.store = dist.distributed_c10d._get_default_store()

    @classmethod
    def for_trainer(cls, trainer) -> "ProgressBoard":
        """The board of a training run (also what ``explain_current`` uses)."""
        global CURRENT
        dims, pipelined = trainer.par.dims, trainer.par.schedule is not None
        phases = {"resume": "DCP load of a checkpoint", "checkpoint": "DCP save of a checkpoint",
                  "gather": "all-reduce of the run's measurements",
                  "verify": "all-reduce of the deviations from the reference"}

        def describe(phase: str) -> str:
            if phase.startswith("step"):
                return step_collectives(dims, pipelined)
            return phases.get(phase.split()[0], phase)

        CURRENT = cls(trainer.info.rank, trainer.info.world_size,
                      trainer.args.runtime.collective_timeout_s, describe=describe)
        return CURRENT

    def before_step(self, step: int) -> None:
        """Before each step: the test hooks, then post the step (a rank stalled by the hook
        is seen as behind)."""
        inject(step, self.rank)
        self.post(f"step {step}")

    def post(self, phase: str) -> None:
        self.seq, self.phase = self.seq + 1, phase
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(f"{self.prefix}{self.rank}", f"{self.seq}|{time.time():.3f}|{phase}")

    def _read(self, rank: int) -> tuple[int, float, str] | None:
        key = f"{self.prefix}{rank}"
        with contextlib.suppress(Exception):
            if self.store.check([key]):
                seq, t, phase = self.store.get(key).decode().split("|", 2)
                return int(seq), float(t), phase
        return None

    def explain(self, exc: BaseException) -> CollectiveTimeout:
        """A one-line error: the operation this rank waited in and the ranks behind it."""
        now = time.time()
        behind, details = [], []
        for r in range(self.world):
            if r == self.rank or self.store is None:
                continue
            got = self._read(r)
            if got is None:
                behind.append(r)
                details.append(f"rank {r} never reported")
            elif got[0] < self.seq:
                behind.append(r)
                details.append(f"rank {r} last reported '{got[2]}' {now - got[1]:.0f} s ago")
        if behind:
            who = f"waiting for rank(s) {', '.join(map(str, behind))} ({'; '.join(details)})"
        else:
            who = f"no rank of {self.world} is behind this one: one stalled inside '{self.phase}'"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[/path/to/file.cc:78] "
        return CollectiveTimeout(
            f"collective timed out after {self.timeout_s:g} s (runtime.collective_timeout_s) on "
            f"rank {self.rank} in {self.phase} ({self.describe(self.phase)}), {who}; backend: {first}")


CURRENT: ProgressBoard | None = None


def explain_current(exc: BaseException) -> BaseException:
    """``exc``, or for a collective timeout the CollectiveTimeout the run's board explains."""
    if CURRENT is not None and is_timeout(exc) and not isinstance(exc, CollectiveTimeout):
        return CURRENT.explain(exc)
    return exc


# ------------------------------------------------------------------ torchrun's summary

_SIGNALS = {int(s): s.name for s in signal.Signals}


def root_cause(log_text: str) -> dict | None:
    """The first observed failure from torchrun's summary: {"rank", "exitcode", "signal"}."""
    i = log_text.rfind("Root Cause (first observed failure)")
    if i < 0:
        return None
    block = log_text[i:i + 2000]
    rank = re.search(r"rank\s*:\s*(\d+)", block)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
    if not rank:
        return None
    exitcode = int(code.group(1)) if code else None
    sig = re.search(r"Signal (\d+) \((SIG\w+)\)", block)
    name = sig.group(2) if sig else (_SIGNALS.get(-exitcode) if exitcode and exitcode < 0 else None)
    return {"rank": int(rank.group(1)), "exitcode": exitcode, "signal": name}


def failure(log_text: str) -> tuple[str | None, bool]:
    """(one-line reason or None, whether it was a collective timeout) of a failed torchrun:
    the PARALLAB-ERROR line of the rank that failed first, or how it died."""
    errors = [l.split("PARALLAB-ERROR", 1)[1].strip(" :") for l in log_text.splitlines()
              if "PARALLAB-ERROR" in l]
    cause = root_cause(log_text)
    reason = None
    if cause is not None:
        mine = [e for e in errors if e.startswith(f"rank {cause['rank']}:")]
        if mine:
            reason = mine[-1]
        elif cause["signal"]:
            reason = (f"rank {cause['rank']} died: killed by {cause['signal']} "
                      f"(exit code {cause['exitcode']})")
    if reason is None and errors:
        timeouts = [e for e in errors if "CollectiveTimeout" in e]
        reason = (timeouts or errors)[0]
    return reason, reason is not None and "CollectiveTimeout" in reason
