"""Plots of a run: ``python -m moco_scale.plot RUN_DIR`` writes ``RUN_DIR/metrics.png`` from ``metrics.jsonl``.

One panel per logged quantity against the step (loss, instance accuracy, learning rate, key
momentum, pairs/s, and kNN top-1 once it is logged); a resumed run's repeated steps are drawn as
logged, the later record winning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

PANELS = {
    "loss": "InfoNCE loss",
    "inst_acc": "instance accuracy",
    "lr": "learning rate",
    "momentum": "key momentum",
    "pairs_per_s": "pairs / s",
    "knn_top1": "kNN top-1 (%)",
    "bad_samples": "bad samples",
}


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Records by step; a later record for the same step (after a resume) replaces the earlier one."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    records: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a last line cut short by a crash
            raise ValueError(f"{path}:{number} is not JSON") from None
        records[int(record["step"])] = record
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def plot_run(run_dir: str | Path) -> Path:
    """Write ``metrics.png`` into ``run_dir`` and return its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = sorted(records)
    shown = [key for key in PANELS if any(key in records[s] for s in steps)]
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, key in zip(axes.flat, shown, strict=False):
        xs = [s for s in steps if key in records[s]]
        ax.plot(xs, [records[s][key] for s in xs], marker="." if len(xs) < 50 else None)
        ax.set_title(PANELS[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = run_dir / "metrics.png"
    figure.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m moco_scale.plot RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(plot_run(args[0]))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
