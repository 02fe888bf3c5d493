"""Optimisers and schedules against plain reference formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from moco_scale.optim import LARS, build_optimizer, key_momentum, learning_rate


def _reference_lars_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    lr: float,
    momentum: float,
    wd: float,
    eta: float,
) -> None:
    for p, g, buf in zip(params, grads, bufs, strict=True):
        if p.ndim > 1:
            g = g + wd * p
            pn, gn = p.norm().item(), g.norm().item()
            g = g * (eta * pn / gn if pn > 0 and gn > 0 else 1.0)
        buf.mul_(momentum).add_(g)
        p.sub_(lr * buf)


def test_lars_matches_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ref_params = [p.detach().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(p) for p in ref_params]
    opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.002)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        _reference_lars_step(ref_params, grads, bufs, 0.5, 0.9, 0.01, 0.002)
    for ours, ref in zip(model.parameters(), ref_params, strict=True):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_build_optimizer_trains(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = build_optimizer(model, name, lr=0.05)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first
    if name == "adamw":  # biases get no weight decay
        assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_learning_rate_warmup_then_cosine() -> None:
    assert learning_rate(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert learning_rate(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0)
    assert learning_rate(37, 100, 0.3, schedule="constant") == 0.3
    # Depends only on the configured length, not on how far a run got.
    assert learning_rate(40, 100, 1.0) == learning_rate(40, 100, 1.0)


def test_key_momentum_cosine_to_one() -> None:
    assert key_momentum(5, 100, 0.999) == 0.999
    assert key_momentum(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert key_momentum(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert key_momentum(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    values = [key_momentum(s, 100, 0.99, "cosine") for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert math.isclose(values[25], 1 - 0.01 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_step_schedule_drops_at_milestones() -> None:
    assert learning_rate(119, 200, 1.0, schedule="step") == 1.0
    assert learning_rate(120, 200, 1.0, schedule="step") == pytest.approx(0.1)
    assert learning_rate(160, 200, 1.0, schedule="step") == pytest.approx(0.01)
