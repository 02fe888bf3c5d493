"""python -m moco_scale.observe.plot RUN_DIR draws metrics.jsonl into metrics.png."""

from __future__ import annotations

import json
from pathlib import Path

from moco_scale.observe import plot


def _write(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_plots_every_logged_quantity(tmp_path: Path) -> None:
    records = [
        {"step": s, "loss": 5.5 - 0.01 * s, "lr": 0.1, "pairs_per_s": 80.0, "inst_acc": 0.01 * s}
        for s in range(5, 55, 5)
    ]
    records.append({"step": 50, "loss": 1.0, "lr": 0.1, "pairs_per_s": 80.0, "inst_acc": 0.9})  # after a resume
    _write(tmp_path, records, tail='{"step": 55, "lo')  # the last line was cut by a crash
    assert plot.read_metrics(tmp_path)[50]["loss"] == 1.0
    assert sorted(plot.read_metrics(tmp_path)) == list(range(5, 55, 5))
    assert plot.main([str(tmp_path)]) == 0
    png = (tmp_path / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (tmp_path / "step_time.png").exists()  # no stage times logged


def test_the_loss_panel_draws_the_chance_level(tmp_path: Path) -> None:
    records = {s: {"step": s, "loss": 5.0 - 0.1 * s, "loss_chance": 5.5530, "inst_acc": 0.1} for s in range(1, 6)}
    figure = plot.metrics_figure(records, "run")
    loss_panel = next(ax for ax in figure.axes if ax.get_title() == "InfoNCE loss")
    flat = [line for line in loss_panel.get_lines() if set(line.get_ydata()) == {5.5530}]
    assert len(flat) == 1 and "chance 5.55" in [t.get_text() for t in loss_panel.get_legend().get_texts()]
    acc_panel = next(ax for ax in figure.axes if ax.get_title() == "instance accuracy")
    assert len(acc_panel.get_lines()) == 1  # the chance level is the loss's
    del records[5]["loss_chance"]  # a run logged before loss_chance existed: no line, no error
    assert (
        len(next(ax for ax in plot.metrics_figure(records, "run").axes if ax.get_title() == "InfoNCE loss").get_lines())
        == 2
    )


def test_step_time_breakdown(tmp_path: Path) -> None:
    stages = {"ms_data_wait": 5.0, "ms_query_fwd_bwd": 60.0, "ms_key_fwd": 20.0, "ms_ema": 1.0, "ms_step": 86.0}
    records = [{"step": s, "loss": 5.0, **stages} for s in range(5, 55, 5)]
    records.insert(0, {"step": 0, "knn_top1": 76.0})  # the step-0 kNN record has no stage times
    _write(tmp_path, records)
    written = plot.plot_run(tmp_path)
    assert [p.name for p in written] == ["metrics.png", "step_time.png"]
    assert (tmp_path / "step_time.png").read_bytes().startswith(b"\x89PNG")


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert plot.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "metrics.png").exists()
    _write(tmp_path, [], tail="not json\n{}\n")
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl:1 is not JSON" in capsys.readouterr().err
    assert plot.main([]) == 2
