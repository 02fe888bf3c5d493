"""Plots of a run: ``python -m moco_scale.observe.plot RUN_DIR`` draws ``metrics.jsonl`` into PNGs beside it.

- ``metrics.png``: one panel per logged quantity against the step (loss, instance accuracy, learning
  rate, key momentum, pairs/s, kNN top-1, bad samples); the loss panel draws the chance level
  (``loss_chance``: ln(K+1) with a queue) as a dashed line;
- ``step_time.png``: where a step's time goes (the ``ms_<stage>`` records of the stage timer),
  stacked against the step, and the run's mean share of each stage.

A resumed run's repeated steps are drawn as logged, the later record winning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

from moco_scale.observe.profiling import STAGE_PREFIX

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


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into ``run_dir`` and return their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = [_plot_metrics(run_dir, records)]
    if any(key.startswith(STAGE_PREFIX) for record in records.values() for key in record):
        written.append(_plot_step_time(run_dir, records))
    return written


def _plot_metrics(run_dir: Path, records: dict[int, dict]) -> Path:
    out = run_dir / "metrics.png"
    metrics_figure(records, str(run_dir)).savefig(out, dpi=100)
    return out


def metrics_figure(records: dict[int, dict], title: str) -> Figure:
    """The panels of ``metrics.png`` for records by step."""
    steps = sorted(records)
    shown = [key for key in PANELS if any(key in records[s] for s in steps)]
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, key in zip(axes.flat, shown, strict=False):
        xs = [s for s in steps if key in records[s]]
        ax.plot(xs, [records[s][key] for s in xs], marker="." if len(xs) < 50 else None)
        chance = [records[s]["loss_chance"] for s in xs if key == "loss" and "loss_chance" in records[s]]
        if chance:
            ax.axhline(chance[-1], color="gray", linestyle="--", label=f"chance {chance[-1]:.2f}")
            ax.legend(loc="upper right", fontsize="small")
        ax.set_title(PANELS[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _plot_step_time(run_dir: Path, records: dict[int, dict]) -> Path:
    steps = [s for s in sorted(records) if any(k.startswith(STAGE_PREFIX) for k in records[s])]
    stages = list(dict.fromkeys(k for s in steps for k in records[s] if k.startswith(STAGE_PREFIX)))
    stages = [k for k in stages if k != f"{STAGE_PREFIX}step"]  # the total, which the stack adds up to
    ms = [[records[s].get(k, 0.0) for s in steps] for k in stages]
    names = [k.removeprefix(STAGE_PREFIX) for k in stages]
    figure = Figure(figsize=(12, 4))
    over_time, shares = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    over_time.stackplot(steps, ms, labels=names)
    over_time.set_title("step time by stage (ms)")
    over_time.set_xlabel("step")
    over_time.legend(loc="upper left", fontsize="small", ncols=2)
    over_time.grid(alpha=0.3)
    means = [sum(row) / len(row) for row in ms]
    total = sum(means) or 1.0
    shares.barh(names[::-1], [100 * m / total for m in means[::-1]])
    shares.set_title(f"mean share of a {total:.0f} ms step (%)")
    shares.grid(alpha=0.3, axis="x")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = run_dir / "step_time.png"
    figure.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m moco_scale.observe.plot RUN_DIR", file=sys.stderr)
        return 2
    try:
        print("\n".join(str(path) for path in plot_run(args[0])))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
