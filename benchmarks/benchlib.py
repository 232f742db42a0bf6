"""What the side-by-side benchmarks share: the machine's two-process ceiling, one readable line
from a failed hand-written run, and running one case without losing the others."""

from __future__ import annotations

import os
import subprocess
import sys


def machine_ceiling(seconds: float = 3.0) -> float:
    """How much two busy single-threaded processes get done together, relative to one alone
    (2.0 on two free cores): the best 2-device speedup this machine allows, whatever the tool."""
    code = ("import time,torch;torch.set_num_threads(1);a=torch.randn(384,384);n=0;"
            f"e=time.perf_counter()+{seconds}\nwhile time.perf_counter()<e:\n a@a;n+=1\nprint(n)")

    def run(k: int) -> int:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(k)]
        return sum(int(p.communicate()[0]) for p in procs)

    return run(2) / run(1)


def raw_failure(mode: str, proc: subprocess.CompletedProcess) -> RuntimeError:
    """The error lines of a failed torchrun of a hand-written loop (not its 2 kB tail, which is
    torchrun's own summary)."""
    cause = [l for l in proc.stderr.splitlines() if "rror" in l or "terminate" in l or "what()" in l]
    return RuntimeError(f"raw {mode}: exit {proc.returncode}: {' | '.join(cause[:6]) or proc.stderr[-800:]}")


def run_samples_per_s(cmd: list[str], tag: str, env: dict | None = None) -> float:
    """Run a benchmark loop (torchrun or accelerate launch, one thread per process) and return
    ``samples_per_s`` from the last JSON line it prints; its error lines if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise raw_failure(tag, proc)
    import json

    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])["samples_per_s"]


def attempt(fn, failures: list[str], tag: str):
    """``fn()``, or None with the failure noted: one failed run (a dropped gloo connection, say)
    must not lose the rest of a long benchmark."""
    try:
        return fn()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        failures.append(f"{tag}: {e}")
        print(f"{tag}: FAILED: {e}", flush=True)
        return None


def record(out: str, name: str, header: str, lines: list[str], failures: list[str], data: dict) -> str:
    """Print the Markdown result and write it, with ``data`` (plus the failures) as JSON, to
    ``out/<name>-<stamp>.md`` and ``.json``; returns the text."""
    import json
    import time
    from pathlib import Path

    if failures:
        lines = [*lines, "", "Failed runs (left out of the medians):", *[f"- {f}" for f in failures]]
    text = header + "\n".join(lines) + "\n"
    print(text)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    (folder / f"{name}-{stamp}.md").write_text(text)
    (folder / f"{name}-{stamp}.json").write_text(json.dumps({**data, "failures": failures}, indent=1))
    return text
