"""Shuffle-BN over all_to_all, split BN and gloo sync BN, against plain reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

from moco_scale.distributed import shuffle
from moco_scale.moco import batchnorm


def _encoder() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).train()


def _rank_batch(rank: int, batch: int) -> torch.Tensor:
    # Per-rank statistics differ a lot, so encoding without the shuffle gives other keys.
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(batch, 3, 6, 6, generator=generator) * (1 + 3 * rank) + 5 * rank


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _reference_keys(x: torch.Tensor, perm: torch.Tensor, encoder: nn.Module, rank: int, batch: int) -> torch.Tensor:
    """The paper's way: gather everything, permute, encode this rank's slice, gather, unpermute."""
    shuffled_all = _gather(x)[perm]
    encoded = encoder(shuffled_all[rank * batch : (rank + 1) * batch])
    encoded_all = _gather(encoded)
    restored = torch.empty_like(encoded_all)
    restored[perm] = encoded_all
    return restored[rank * batch : (rank + 1) * batch]


def _check_matches_reference(rank: int, world: int, batch: int) -> None:
    x = _rank_batch(rank, batch)
    with torch.no_grad():
        for step in range(3):
            plan = shuffle.plan_for_step(seed=7, step=step, batch=batch, device=x.device)
            ours = shuffle.unshuffle(_encoder()(shuffle.shuffle(x, plan)), plan)
            perm = shuffle.global_permutation(7, step, world * batch)
            reference = _reference_keys(x, perm, _encoder(), rank, batch)
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
            unshuffled = _encoder()(x)  # what skipping the shuffle would give
            assert (ours - unshuffled).abs().max() > 1e-2, "shuffle had no effect: the test could not fail"


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_shuffle_matches_gather_reference(world: int) -> None:
    run_ranks(_check_matches_reference, world, 8)


def test_plan_round_trip_without_processes() -> None:
    """make_plan for every rank of a 4-rank world, with the all_to_all done by hand."""
    world, batch = 4, 5
    data = torch.arange(world * batch).float()
    perm = shuffle.global_permutation(3, 11, world * batch)
    plans = [shuffle.make_plan(perm, r, world, batch, torch.device("cpu")) for r in range(world)]
    for r in range(world):
        assert sum(plans[r].send_counts) == batch and sum(plans[r].recv_counts) == batch
    # Hand-made all_to_all: rank r's outgoing buffer is split by send_counts, one chunk per destination.
    outgoing = [
        list(data[r * batch : (r + 1) * batch][plans[r].send_rows].split(plans[r].send_counts)) for r in range(world)
    ]
    for r in range(world):
        received = torch.cat([outgoing[s][r] for s in range(world)])
        shuffled = torch.empty(batch)
        shuffled[plans[r].recv_slots] = received
        torch.testing.assert_close(shuffled, data[perm][r * batch : (r + 1) * batch])


def test_permutation_is_shared_and_changes_per_step() -> None:
    a, b = shuffle.global_permutation(1, 5, 64), shuffle.global_permutation(1, 5, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, shuffle.global_permutation(1, 6, 64))
    assert torch.equal(a.sort().values, torch.arange(64))


def test_single_process_shuffle_is_local_permutation() -> None:
    x = torch.randn(12, 3)
    plan = shuffle.make_plan(shuffle.global_permutation(0, 2, 12), 0, 1, 12, torch.device("cpu"))
    shuffled = shuffle.shuffle(x, plan)
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(shuffled.sort(0).values, x.sort(0).values)
    torch.testing.assert_close(shuffle.unshuffle(shuffled, plan), x)


def test_split_batchnorm_matches_per_group_reference() -> None:
    torch.manual_seed(0)
    groups, batch = 4, 16
    x = torch.randn(batch, 3, 5, 5) + torch.arange(batch).view(-1, 1, 1, 1) * 0.3
    split = batchnorm.SplitBatchNorm(3, groups)
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5)
        split.bias.uniform_(-0.5, 0.5)
    out = split(x)
    expected = torch.empty_like(x)
    means, variances = [], []
    for g in range(groups):
        members = x[g::groups]
        mean = members.mean((0, 2, 3))
        var = members.var((0, 2, 3), unbiased=False)
        expected[g::groups] = (members - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + split.eps)
        expected[g::groups] = expected[g::groups] * split.weight.view(1, -1, 1, 1) + split.bias.view(1, -1, 1, 1)
        means.append(mean)
        variances.append(members.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.running_mean, 0.1 * torch.stack(means).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(split.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0), rtol=1e-4, atol=1e-6)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split.state_dict())
    assert (split(x) - plain.train()(x)).abs().max() > 1e-2  # the split really changes the statistics
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    torch.testing.assert_close(split(x), plain(x))


def test_split_batchnorm_rejects_uneven_batch() -> None:
    with pytest.raises(ValueError, match="does not split into 4"):
        batchnorm.SplitBatchNorm(3, 4)(torch.randn(6, 3, 2, 2))


def _check_sync_bn(rank: int, world: int, dims: int) -> None:
    torch.manual_seed(0)
    shape = (6, 4, 3, 3) if dims == 4 else (6, 4)
    full = torch.randn(world * shape[0], *shape[1:]) * 2 + 1
    full[shape[0] :] += 3  # ranks see different statistics
    reference = (nn.BatchNorm2d(4) if dims == 4 else nn.BatchNorm1d(4)).train()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    synced = batchnorm.convert_batchnorm(nn.Sequential(reference), "sync", 2, 1, torch.device("cpu"))[0]
    reference = (nn.BatchNorm2d(4) if dims == 4 else nn.BatchNorm1d(4)).train()
    reference.load_state_dict(synced.state_dict())
    assert isinstance(synced, batchnorm.GlooSyncBatchNorm)
    weights = torch.randn_like(full)
    local = full[rank * shape[0] : (rank + 1) * shape[0]].clone().requires_grad_(True)
    out = synced(local)
    (out * weights[rank * shape[0] : (rank + 1) * shape[0]]).sum().backward()
    whole = full.clone().requires_grad_(True)
    expected = reference(whole)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected[rank * shape[0] : (rank + 1) * shape[0]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(local.grad, whole.grad[rank * shape[0] : (rank + 1) * shape[0]], rtol=1e-4, atol=1e-4)
    weight_grad = synced.weight.grad.clone()
    dist.all_reduce(weight_grad)  # data-parallel gradient reduction
    torch.testing.assert_close(weight_grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(synced.running_mean, reference.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced.running_var, reference.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 4])
def test_gloo_sync_batchnorm_matches_full_batch(dims: int) -> None:
    run_ranks(_check_sync_bn, 2, dims)


def test_convert_keeps_state_and_modes() -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(3)))
    net[1].running_mean.fill_(2.0)
    split = batchnorm.convert_batchnorm(net, "shuffle", 1, 2, torch.device("cpu"))
    assert isinstance(split[1], batchnorm.SplitBatchNorm) and split[1].running_mean[0] == 2.0
    assert type(split[2][0]) is nn.BatchNorm1d  # heads keep plain BN in split mode
    across_ranks = nn.Sequential(nn.BatchNorm2d(3))
    assert type(batchnorm.convert_batchnorm(across_ranks, "shuffle", 2, 2, torch.device("cpu"))[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown moco.shuffle_bn 'bogus'"):
        batchnorm.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), "bogus", 1, 1, torch.device("cpu"))
