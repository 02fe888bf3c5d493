"""Run output: the rank-0 progress bar, ``metrics.jsonl`` (one flushed line per log step), the summary,
and training-health warnings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moco_scale.observe.loggers import Sink


class MetricsLogger:
    """Appends JSON lines to ``<run_dir>/metrics.jsonl``, hands each record and warning to the other loggers
    (``sinks``: TensorBoard, W&B) and drives the progress bar (rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        progress: bool = True,
        sinks: Sequence[Sink] = (),
    ):
        self.enabled = enabled
        self.sinks = sinks
        self.step = initial_step
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
        self.headline: dict[str, float] = {}  # the latest loss, inst_acc and kNN top-1, with their steps

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (a dict with at least ``step``) and refresh the bar."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _json_number(v) for k, v in record.items()}}
        with self.path.open("a") as f:  # reopened each time: a crash loses at most the current line
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self.last = record
        self.step = record["step"]
        if record.get("loss") is not None:
            self.headline.update(loss=record["loss"], inst_acc=record.get("inst_acc"), loss_step=self.step)
        if record.get("knn_top1") is not None:
            self.headline.update(knn_top1=record["knn_top1"], knn_step=self.step)
        scalars = {k: v for k, v in record.items() if k not in ("time", "step") and isinstance(v, int | float)}
        for sink in self.sinks:
            sink.scalars(scalars, self.step)
        shown = {k: record[k] for k in ("loss", "inst_acc", "lr", "pairs_per_s", "knn_top1") if k in record}
        self.bar.set_postfix({k: "nan" if v is None else f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def warn(self, message: str) -> None:
        """A one-line warning on stderr that does not break the progress bar (rank 0 only)."""
        if self.enabled:
            tqdm.write(f"warning: {message}", file=sys.stderr)
            for sink in self.sinks:
                sink.text(message, self.step)

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        self.bar.update(steps)

    def close(self) -> str:
        """Close the bar and the other loggers, and return the one-line summary."""
        self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = ()
        elapsed = time.perf_counter() - self.start
        last = ", ".join(
            f"{k}={v:.4g}"
            for k, v in self.last.items()
            if k not in ("time", "step") and not k.startswith("ms_") and isinstance(v, float)  # ms_: in the plot
        )
        return f"done: {self.last.get('step', 0)} steps in {elapsed:.1f}s; last {last}; metrics in {self.path}"


def code_version() -> str:
    """The git commit of the moco_scale code running (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        changes = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if changes.stdout.strip() else "")


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite float is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def chance_loss(version: str, queue_size: int, global_batch: int, temperature: float) -> float:
    """The loss when a query cannot tell its key from the negatives (all logits equal): ln(K+1) with a
    queue; for v3, whose loss is 2T x (CE_12 + CE_21) over the global batch, 4T ln(N)."""
    if version == "v3":
        return 4 * temperature * math.log(global_batch)
    return math.log(queue_size + 1)


def queue_size_warning(version: str, queue_size: int, num_samples: int) -> str | None:
    """A queue over a quarter of the dataset holds each image's own keys from recent epochs as
    negatives, which can drive training to collapse (seen on the 1,497 digits with K=1024)."""
    if version == "v3" or 4 * queue_size <= num_samples:
        return None
    return (
        f"moco.queue_size={queue_size} is over a quarter of the {num_samples:,} training samples: an image's own "
        f"earlier keys sit in the queue as negatives, which can collapse the loss to ln(K+1)="
        f"{math.log(queue_size + 1):.2f}; use K <= {num_samples // 4}"
    )


class CollapseWatch:
    """Warns once when the loss drifts toward chance (:func:`chance_loss`), the mark of a collapsed
    representation whose queries match every candidate alike.

    The loss is smoothed (exponential average over logged values) and watched from ``start_step`` on
    (after warm-up and once the queue holds real keys: its random initial entries make early losses
    low). It warns when the smoothed loss, having once been at least three ``tolerance`` (relative)
    below chance, has given back a quarter of that gain. On the 1,497 digits with K=1024 the loss fell
    to 5.7 and then climbed back toward ln(1025) = 6.93; the rule fires there at about 6.1. A loss
    that has not yet left chance (early in a short run) is not flagged.
    """

    def __init__(self, chance: float, start_step: int, tolerance: float = 0.01):
        self.chance, self.start_step, self.tolerance = chance, start_step, tolerance
        self.smoothed: float | None = None
        self.best = math.inf
        self.warned = False

    def update(self, step: int, loss: float) -> str | None:
        """Feed the loss logged at ``step``; returns the warning the first time the rule fires."""
        if step < self.start_step or self.warned or not math.isfinite(loss):
            return None
        self.smoothed = loss if self.smoothed is None else 0.7 * self.smoothed + 0.3 * loss
        self.best = min(self.best, self.smoothed)
        learned = self.best <= self.chance * (1 - 3 * self.tolerance)
        if not (learned and self.smoothed - self.best >= (self.chance - self.best) / 4):
            return None
        self.warned = True
        return (
            f"possible collapse at step {step}: loss {self.smoothed:.3f} drifts back from {self.best:.3f} toward "
            f"chance {self.chance:.3f}; check inst_acc and knn_top1, and lower the learning rate or the queue size"
        )
