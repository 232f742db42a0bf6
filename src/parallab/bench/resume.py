"""Sweeps that lose nothing.

* One sweep per run folder at a time: ``RunLock`` holds ``<run>/.lock`` (the pid and host in
  it, an exclusive ``flock`` on it). A second sweep into the same folder is refused; a lock
  left by a process that died (its flock went with it) is taken over with a warning.
* ``parallab sweep --resume RUN_DIR``: the settings the sweep started with (``sweep.json``),
  and only the configurations missing from ``results.jsonl``; the single-device run is
  repeated first when its reference file is missing (its row is not written twice).

Nothing here is unpickled: sweep.json and results.jsonl are JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from parallab.config import ConfigError, from_dict, to_dict

LOCK_NAME = ".lock"
# Settings a resumed sweep may change: which configurations, limits, where checkpoints go.
RESUMABLE = {"sweep", "resume", "runtime.collective_timeout_s", "runtime.max_restarts",
             "runtime.port", "runtime.out_dir", "runtime.run_id", "train.checkpoint_every",
             "train.checkpoint_dir", "train.checkpoint_keep"}


class RunLock:
    """``with RunLock(run_folder):`` the only sweep writing into ``run_folder``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _holder(fd: int) -> str:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd) or "unknown"
                os.close(fd)
                raise ConfigError(f"run folder '{self.root}' is in use by another parallab sweep "
                                  f"(pid {holder.split()[0]}, lock file {self.path}); wait for it to "
                                  "finish, or choose another runtime.run_id") from None
            try:  # released and removed between our open and flock: lock the new file instead
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._holder(fd)
        if holder and holder.split()[0] != str(os.getpid()):
            print(f"parallab: warning: taking over the stale lock {self.path} of pid "
                  f"{holder.split()[0]}, which is no longer running", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # removed while still locked: no one sees it free early
        os.close(self.fd)
        self.fd = None


def sweep_settings_file(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    path = run / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"run folder '{run}' has no sweep.json (give a folder made by parallab "
                          "sweep to --resume)")
    return path


def load_settings(cls, run_dir: str | os.PathLike):
    """The settings a sweep in ``run_dir`` started with, pointed back at ``run_dir``."""
    path = sweep_settings_file(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{path}' is not valid JSON ({e})") from None
    settings = from_dict(cls, data)
    run = Path(run_dir)
    settings.runtime.out_dir, settings.runtime.run_id = str(run.parent), run.name
    settings.resume = str(run)
    return settings


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_settings(args, run_dir: str | os.PathLike) -> None:
    """A resumed sweep computes what the interrupted one would have: refuse changed settings."""
    saved = _flat(json.loads(sweep_settings_file(run_dir).read_text(encoding="utf-8")))
    now = _flat(json.loads(json.dumps(to_dict(args))))
    diffs = [k for k in now if k in saved and now[k] != saved[k]
             and k not in RESUMABLE and k.split(".")[0] not in RESUMABLE]
    if diffs:
        k = diffs[0]
        raise ConfigError(f"--resume: {k}={now[k]!r} differs from the run's sweep.json ({k}="
                          f"{saved[k]!r}); a resumed sweep keeps the settings it started with")


def finished(results: Path) -> dict[tuple[str, str], list[dict]]:
    """Rows already in results.jsonl by (mode, config id); a torn last line is skipped."""
    from parallab.bench.result import read_rows

    done: dict[tuple[str, str], list[dict]] = {}
    if results.exists():
        for row in read_rows(results):
            done.setdefault((row.get("mode") or "train", row.get("config_id")), []).append(row)
    return done


def mark_finished(entries, folder) -> None:
    """Entries whose rows are already in results.jsonl are marked finished (not run again).
    The single-device entry of a mode is run again when its reference file is missing."""
    done = finished(folder.results)
    references = {"train": folder.root / "reference.pt", "infer": folder.root / "reference-infer.pt"}
    seen_single: set[str] = set()
    for e in entries:
        rows = done.get((e.mode, e.cid))
        is_reference = e.args.parallel.strategy == "single" and e.mode not in seen_single
        if is_reference:
            seen_single.add(e.mode)
        if not rows:
            continue
        ok = any(r.get("status") == "ok" for r in rows)
        if is_reference and not (ok and references[e.mode].exists()):
            e.append = not ok  # rerun for the reference file; an ok row is not written twice
            continue
        e.rows, e.state = rows, "finished"


def resume_folder(args):
    """(folder, run id) of ``parallab sweep --resume RUN_DIR``, after checking its settings."""
    from parallab.bench.launch import RunFolder

    check_same_settings(args, args.resume)
    return RunFolder(Path(args.resume)).create(), Path(args.resume).name


def start_sweep(args, entries, folder) -> RunLock:
    """Lock the run folder for this sweep, then write sweep.json (a new sweep) or mark the
    entries that finished before (--resume). The caller releases the lock."""
    lock = RunLock(folder.root)
    lock.acquire()
    try:
        if args.resume:
            mark_finished(entries, folder)
        else:
            (folder.root / "sweep.json").write_text(json.dumps(to_dict(args), indent=1))
    except BaseException:
        lock.release()
        raise
    return lock
