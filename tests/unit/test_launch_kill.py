"""A timed-out or interrupted configuration leaves no worker behind, even a worker that torchrun
started in a session of its own (out of reach of a signal to torchrun's process group)."""

import os
import subprocess
import sys
import time

from parallab.bench.launch import _descendants, kill_tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_tree_reaches_workers_in_their_own_session():
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)'], start_new_session=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 20
    while not _descendants(parent.pid) and time.time() < deadline:
        time.sleep(0.1)
    workers = _descendants(parent.pid)
    assert workers, "the child did not start"
    kill_tree(parent)
    time.sleep(0.3)
    assert parent.returncode is not None
    assert not [w for w in workers if _alive(w)], "a worker survived"
    assert os.getpid()  # this process is untouched
