"""The fused momentum update against the per-parameter reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moco_scale.moco.momentum import MomentumUpdater
from moco_scale.models import build_resnet


def _pair(device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = build_resnet("resnet18").to(device)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        for b in online.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
            else:
                b.add_(3)
    return online, target


def _reference_step(online: nn.Module, target: nn.Module, m: float, policy: str) -> None:
    with torch.no_grad():
        for q, k in zip(online.parameters(), target.parameters(), strict=True):
            k.mul_(m).add_(q, alpha=1 - m)
        for q, k in zip(online.buffers(), target.buffers(), strict=True):
            if policy == "copy" or (policy == "ema" and not q.is_floating_point()):
                k.copy_(q)
            elif policy == "ema":
                k.mul_(m).add_(q, alpha=1 - m)


def _perturb(online: nn.Module, step: int) -> None:
    with torch.no_grad():  # the optimizer moving the query encoder between steps
        for p in online.parameters():
            p.add_(0.01 * (step + 1))
        for b in online.buffers():
            b.add_(1)


@pytest.mark.parametrize("policy", ["own", "copy", "ema"])
def test_fused_update_matches_reference_loop(policy: str) -> None:
    online, target = _pair()
    ref_online, ref_target = copy.deepcopy(online), copy.deepcopy(target)
    updater = MomentumUpdater(online, target, policy, cuda_graph=False)
    untouched = [b.clone() for b in target.buffers()]
    for step, m in enumerate([0.99, 0.9, 0.999, 0.5, 0.0, 0.97]):  # a changing momentum
        updater(m)
        _reference_step(ref_online, ref_target, m, policy)
        _perturb(online, step)
        _perturb(ref_online, step)
    for ours, ref in zip(target.state_dict().values(), ref_target.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    moved = any(not torch.equal(a, b) for a, b in zip(untouched, target.buffers(), strict=True))
    assert moved == (policy != "own")


@pytest.mark.parametrize("policy", ["own", "ema"])
def test_update_follows_a_move_or_recast_after_the_first_step(policy: str) -> None:
    """``.double()`` (a re-cast) and ``.to(channels_last)`` after the first updates swap every parameter's storage
    and replace the buffers; the updater must move the tensors the modules hold now, not the old ones."""
    online, target = _pair()
    ref_online, ref_target = copy.deepcopy(online), copy.deepcopy(target)
    updater = MomentumUpdater(online, target, policy, cuda_graph=False)
    moves = {2: lambda module: module.double(), 4: lambda module: module.to(memory_format=torch.channels_last)}
    for step, m in enumerate([0.99, 0.9, 0.999, 0.5, 0.97, 0.8]):
        if step in moves:
            for module in (online, target, ref_online, ref_target):
                moves[step](module)
        updater(m)
        _reference_step(ref_online, ref_target, m, policy)
        _perturb(online, step)
        _perturb(ref_online, step)
    assert next(target.parameters()).dtype == torch.float64
    for ours, ref in zip(target.state_dict().values(), ref_target.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_momentum_one_freezes_and_zero_copies() -> None:
    online, target = _pair()
    before = [p.clone() for p in target.parameters()]
    updater = MomentumUpdater(online, target, cuda_graph=False)
    updater(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    updater(0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters(), strict=True))


def test_rejects_bad_input() -> None:
    online, target = _pair()
    with pytest.raises(ValueError, match="buffer_policy"):
        MomentumUpdater(online, target, "average")
    with pytest.raises(ValueError, match="momentum"):
        MomentumUpdater(online, target)(1.5)
    with pytest.raises(ValueError, match="same parameter names"):
        MomentumUpdater(online, nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_update_matches_reference_loop() -> None:
    online, target = _pair("cuda")
    ref_online, ref_target = copy.deepcopy(online), copy.deepcopy(target)
    updater = MomentumUpdater(online, target, "ema", cuda_graph=True)
    for step, m in enumerate([0.99, 0.9, 0.999, 0.5, 0.97, 0.995]):
        if step == 3:  # a move after capture: the graph must be captured again on the new storage
            for module in (online, target, ref_online, ref_target):
                module.to(memory_format=torch.channels_last)
        updater(m)
        _reference_step(ref_online, ref_target, m, "ema")
        _perturb(online, step)
        _perturb(ref_online, step)
    assert updater._graph is not None  # replayed, not re-run eagerly
    for ours, ref in zip(target.state_dict().values(), ref_target.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
