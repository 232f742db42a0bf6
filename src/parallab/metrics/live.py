"""Live per-step metrics while a run goes: rank 0 appends one CSV line per step (read by the
sweep's progress display) and, when asked, writes TensorBoard scalars (optional dependency)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ("step", "steps", "phase", "seconds", "samples_per_s", "tokens_per_s", "loss")


class StepLog:
    """Rank 0's view of each step as it ends (not the slowest rank's: that needs a collective
    per step, which the timed steps must not pay; the result row has the exact numbers)."""

    def __init__(self, csv_path: Path, *, steps: int, samples_per_step: int, tokens_per_step: int,
                 tensorboard_dir: Path | None = None):
        self.steps, self.samples, self.tokens = steps, samples_per_step, tokens_per_step
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(csv_path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(COLUMNS)
        self._file.flush()
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, step: int, seconds: float, loss: float | None, phase: str) -> None:
        sps = self.samples / seconds if seconds > 0 else float("nan")
        tps = self.tokens / seconds if seconds > 0 else float("nan")
        has_loss = loss is not None and not math.isnan(loss)
        self._csv.writerow((step + 1, self.steps, phase, f"{seconds:.6f}", f"{sps:.4f}", f"{tps:.2f}",
                            f"{loss:.6f}" if has_loss else ""))
        self._file.flush()  # the sweep's display reads it while the run goes on
        if self._tb is not None:
            self._tb.add_scalar("step_time_s", seconds, step + 1)
            self._tb.add_scalar("samples_per_s", sps, step + 1)
            self._tb.add_scalar("tokens_per_s", tps, step + 1)
            if has_loss:
                self._tb.add_scalar("loss", loss, step + 1)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def last_step(csv_path: Path) -> dict | None:
    """The newest complete line of a step log, or None."""
    try:
        lines = csv_path.read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 2:
        return None
    values = next(csv.reader([lines[-1]]))
    return dict(zip(COLUMNS, values)) if len(values) == len(COLUMNS) else None


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
