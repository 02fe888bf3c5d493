"""Helpers shared by the benchmarks: interleaved timing with warm-up and median, tables, JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo spells it, or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: versions, threads, cores, devices, date."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def time_interleaved(
    methods: dict[str, Callable[[], object]],
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device | None = None,
    before_repeat: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each method, one figure per repetition.

    Every method gets ``warmup`` untimed calls, then ``repeats`` rounds in which each method in
    turn runs ``steps`` timed calls, so slow drift of the machine (other jobs, clocks) falls on
    all methods alike. On CUDA the time comes from events on the current stream; on the CPU
    from ``perf_counter``. ``before_repeat`` (e.g. a barrier) runs before each timed block.
    """
    cuda = device is not None and device.type == "cuda"
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if before_repeat is not None:
                before_repeat()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / steps)
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / steps)
    return samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median over the repetitions: how much the machine wobbled."""
    mid = median(values)
    return float((max(values) - min(values)) / mid) if mid else 0.0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown pipe table (readable as plain text too), numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) or row[i] == "-" for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(cells[0]), rule + "|", *(line(r) for r in cells[1:])])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3f}"
        return f"{value:.3g}"
    return str(value)


def write_json(path: str | os.PathLike[str] | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (parents created); nothing when ``path`` is empty."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {target}")
