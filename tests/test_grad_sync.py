"""The overlapped gradient averager on 2 gloo ranks equals a plain all-reduce of each gradient, divided."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn

from moco_scale.distributed.grad_sync import OverlappedGradientAverager


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.Linear(10, 4))


def _averages_like_a_plain_all_reduce(rank: int, world: int, bucket_mb: float, layers: int, attach: bool) -> None:
    ours, reference = _model(), _model()
    if attach:  # a channels-last parameter: its bucket view keeps the layout
        ours[0].weight.data = ours[0].weight.data.contiguous(memory_format=torch.channels_last)
    averager = OverlappedGradientAverager(list(ours.parameters()), bucket_mb=bucket_mb)
    assert (len(averager.buckets) > 2) == (bucket_mb < 0.001)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10 * rank + step))
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        if attach:
            averager.attach()
        ours[:layers](x).square().mean().backward()
        if layers == len(ours):  # every bucket filled during backward, so each reduction was launched there
            assert len(averager.handles) == len(averager.buckets)
        averager.wait()
        reference[:layers](x).square().mean().backward()
        for name, p in reference.named_parameters():
            expected = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(expected)
            expected /= world
            got = dict(ours.named_parameters())[name].grad
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")
    unused = list(ours[layers:].parameters())  # their gradients never came: reduced (as zeros) at wait()
    assert all(p.grad is not None and not p.grad.any() for p in unused)
    for p in ours.parameters():  # every gradient lives in its bucket, with its parameter's layout
        buffer = averager.buffers[averager.bucket_of[p]]
        assert p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert p.grad.stride() == p.stride()


@pytest.mark.parametrize("attach", [False, True])
def test_overlapped_average_equals_plain_all_reduce(attach: bool) -> None:
    run_ranks(_averages_like_a_plain_all_reduce, 2, 25.0, 5, attach)  # one bucket


@pytest.mark.parametrize("attach", [False, True])
def test_many_buckets_and_a_layer_left_out(attach: bool) -> None:
    run_ranks(_averages_like_a_plain_all_reduce, 2, 0.0005, 4, attach)  # ~500 bytes: a bucket per parameter or two


def _mixed_dtypes(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double())
    reference = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double())
    reference.load_state_dict(model.state_dict())
    averager = OverlappedGradientAverager(list(model.parameters()))
    assert [{p.dtype for p in bucket} for bucket in averager.buckets] == [{torch.float64}, {torch.float32}]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))
    averager.attach()
    model[1](model[0](x).double()).sum().backward()
    averager.wait()
    reference[1](reference[0](x).double()).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        expected = q.grad.clone()
        dist.all_reduce(expected)
        torch.testing.assert_close(p.grad, expected / world, msg=name)


def test_parameters_of_another_dtype_get_their_own_bucket() -> None:
    run_ranks(_mixed_dtypes, 2)
