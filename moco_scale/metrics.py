"""Run output: the rank-0 progress bar, ``metrics.jsonl`` (one flushed line per log step), the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Appends JSON lines to ``<run_dir>/metrics.jsonl`` and drives the progress bar (rank 0 only)."""

    def __init__(
        self, run_dir: str | Path, total_steps: int, initial_step: int = 0, enabled: bool = True, progress: bool = True
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and progress),
        )
        self.start = time.perf_counter()
        self.last: dict[str, Any] = {}

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (a dict with at least ``step``) and refresh the bar."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:  # reopened each time: a crash loses at most the current line
            f.write(json.dumps(record) + "\n")
        self.last = record
        shown = {k: record[k] for k in ("loss", "inst_acc", "lr", "pairs_per_s", "knn_top1") if k in record}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> str:
        """Close the bar and return the one-line summary."""
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        last = ", ".join(
            f"{k}={v:.4g}" for k, v in self.last.items() if k not in ("time", "step") and isinstance(v, float)
        )
        return f"done: {self.last.get('step', 0)} steps in {elapsed:.1f}s; last {last}; metrics in {self.path}"
