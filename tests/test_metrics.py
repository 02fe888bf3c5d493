"""Run output and training-health warnings: chance level, queue size against the dataset, collapse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moco_scale.observe.metrics import CollapseWatch, MetricsLogger, chance_loss, queue_size_warning


def test_chance_loss_is_the_loss_of_equal_logits() -> None:
    import torch
    import torch.nn.functional as F

    equal = torch.zeros(4, 257)  # a positive and 256 negatives, all alike
    assert chance_loss("v2", 256, 64, 0.2) == pytest.approx(F.cross_entropy(equal, torch.zeros(4, dtype=torch.long)))
    in_batch = torch.zeros(64, 64)  # v3: 2T x (CE_12 + CE_21) over the global batch
    ce = F.cross_entropy(in_batch, torch.arange(64)).item()
    assert chance_loss("v3", 0, 64, 0.2) == pytest.approx(2 * 0.2 * 2 * ce)


def test_queue_size_warning_when_the_queue_covers_over_a_quarter_of_the_data() -> None:
    warning = queue_size_warning("v2", 1024, 1497)
    assert warning is not None and "over a quarter of the 1,497" in warning and "K <= 374" in warning
    assert "\n" not in warning
    assert queue_size_warning("v2", 256, 1497) is None
    assert queue_size_warning("v1", 374, 1497) is None
    assert queue_size_warning("v3", 65536, 1497) is None  # no queue


def _feed(watch: CollapseWatch, losses: list[float], every: int = 5) -> list[tuple[int, str]]:
    fired = []
    for i, loss in enumerate(losses, 1):
        if warning := watch.update(i * every, loss):
            fired.append((i * every, warning))
    return fired


CHANCE = math.log(257)
# Logged losses of two real runs on the demo digits (2 CPU ranks, global batch 64, warm-up 10 steps):
# K=1024, logged every 5 steps for 200 steps: down to ~5.7 by step 55, then back up toward ln(1025);
# fmt: off
K1024_RUN = [
    5.722, 6.386, 6.663, 6.750, 6.622, 6.500, 6.232, 5.990, 5.826, 5.736, 5.691, 5.731, 5.772, 5.773,
    5.810, 5.820, 5.839, 5.831, 5.864, 5.924, 5.865, 5.967, 5.990, 5.913, 5.951, 6.032, 5.966, 5.990,
    6.008, 6.120, 6.045, 6.048, 6.080, 6.128, 6.277, 6.257, 6.259, 6.343, 6.490, 6.411,
]
# fmt: on
# K=256 (the demo's), every step for 40 steps: low while the queue holds random keys, then at chance
# and slowly below it.
# fmt: off
DEMO_RUN = [
    2.882, 4.397, 4.914, 5.304, 5.559, 5.536, 5.539, 5.581, 5.559, 5.578, 5.578, 5.509, 5.568, 5.512,
    5.518, 5.557, 5.512, 5.534, 5.513, 5.555, 5.522, 5.497, 5.505, 5.531, 5.529, 5.534, 5.540, 5.511,
    5.504, 5.493, 5.480, 5.471, 5.532, 5.553, 5.489, 5.482, 5.502, 5.513, 5.515, 5.538,
]
# fmt: on


def test_the_real_k1024_drift_toward_chance_warns_once() -> None:
    fired = _feed(CollapseWatch(math.log(1025), start_step=32), K1024_RUN)
    assert len(fired) == 1
    step, warning = fired[0]
    assert 100 < step < 200 and "possible collapse" in warning and "toward chance 6.932" in warning
    assert "\n" not in warning


def test_healthy_runs_get_no_warning() -> None:
    assert _feed(CollapseWatch(CHANCE, start_step=10), DEMO_RUN, every=1) == []
    early = [2.9, 4.4, 5.3]  # before the start step
    learning = [CHANCE - 0.005 * i + 0.03 * (-1) ** i for i in range(37)]  # slow fall, +-0.03 noise
    assert _feed(CollapseWatch(CHANCE, start_step=16), early + learning) == []


def test_collapse_back_toward_chance_warns_once() -> None:
    down = [CHANCE - 0.02 * i for i in range(20)]  # to ~5.17
    back = [down[-1] + 0.04 * i for i in range(1, 12)] + [CHANCE] * 8
    fired = _feed(CollapseWatch(CHANCE, start_step=10), down + back)
    assert len(fired) == 1 and fired[0][0] > 20 * 5


def test_early_low_losses_before_the_start_step_are_ignored() -> None:
    """The queue's random initial keys make the first losses low; the rise to chance that follows
    is not a collapse."""
    watch = CollapseWatch(CHANCE, start_step=21)
    assert _feed(watch, [2.0, 3.0, 4.0, 5.0] + [CHANCE] * 10) == []
    assert _feed(CollapseWatch(CHANCE, start_step=0), [2.0, 3.0, 4.0, 5.0] + [CHANCE] * 10) != []


def test_warnings_go_to_stderr_and_records_to_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False)
    logger.warn("queue too large")
    logger.log({"step": 1, "loss": 5.0})
    assert "warning: queue too large" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 5.0
    silent = MetricsLogger(tmp_path / "other", total_steps=2, enabled=False)  # ranks other than 0
    silent.warn("nothing")
    assert capsys.readouterr().err == ""
