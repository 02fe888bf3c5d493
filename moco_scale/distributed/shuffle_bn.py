"""Batch-norm modes for the key encoder: shuffle-BN over one ``all_to_all``, split BN, sync BN.

Shuffle-BN (MoCo v1/v2) stops the key encoder's BN statistics from leaking which keys match
which queries. Across W ranks, the global key batch is permuted by a permutation that every
rank derives from a shared seed, so nothing is broadcast: one ``all_to_all`` sends each rank's
B keys to where the permutation puts them (each rank sends and receives exactly B rows), the
keys are encoded, and the inverse ``all_to_all`` brings them home. In one process,
:class:`SplitBatchNorm` gives G virtual groups their own statistics so shuffling still matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from moco_scale.distributed.comm import rank, world_size


@dataclass(frozen=True)
class ShufflePlan:
    """How this rank's rows move under one global permutation, and back."""

    send_rows: torch.Tensor  # local rows in sending order: by destination rank, then destination slot
    send_counts: list[int]  # rows sent to each rank
    recv_slots: torch.Tensor  # slot in the shuffled local batch of each received row, in arrival order
    recv_counts: list[int]  # rows received from each rank


def global_permutation(seed: int, step: int, total: int) -> torch.Tensor:
    """The permutation of the global batch for ``step``: identical on every rank, never sent."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(total, generator=generator)


def make_plan(perm: torch.Tensor, rank_: int, world: int, batch: int, device: torch.device) -> ShufflePlan:
    """Plan for ``perm``: shuffled global slot ``p`` holds the original global row ``perm[p]``."""
    new_slot = torch.argsort(perm)  # original global row -> shuffled global slot
    mine = new_slot[rank_ * batch : (rank_ + 1) * batch]
    send_rows = torch.argsort(mine, stable=True)
    send_counts = torch.bincount(mine // batch, minlength=world).tolist()
    sources = perm[rank_ * batch : (rank_ + 1) * batch] // batch
    # Each sender orders its rows by destination slot, so arrivals are sorted by (source, slot).
    recv_slots = torch.argsort(sources, stable=True)
    recv_counts = torch.bincount(sources, minlength=world).tolist()
    return ShufflePlan(send_rows.to(device), send_counts, recv_slots.to(device), recv_counts)


def _exchange(rows: torch.Tensor, out_counts: list[int], in_counts: list[int]) -> torch.Tensor:
    if len(out_counts) == 1:
        return rows
    received = torch.empty_like(rows)
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=in_counts, input_split_sizes=out_counts)
    return received


@torch.no_grad()
def shuffle(x: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Send this rank's rows to their shuffled owners with one ``all_to_all``."""
    received = _exchange(x[plan.send_rows], plan.send_counts, plan.recv_counts)
    out = torch.empty_like(received)
    out[plan.recv_slots] = received
    return out


@torch.no_grad()
def unshuffle(y: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Inverse of :func:`shuffle`: one ``all_to_all`` back, rows restored to their original order."""
    returned = _exchange(y[plan.recv_slots], plan.recv_counts, plan.send_counts)
    out = torch.empty_like(returned)
    out[plan.send_rows] = returned
    return out


def plan_for_step(seed: int, step: int, batch: int, device: torch.device) -> ShufflePlan:
    world = world_size()
    return make_plan(global_permutation(seed, step, world * batch), rank(), world, batch, device)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``num_splits`` interleaved sub-batches.

    Sample ``n`` falls in group ``n % num_splits``, as if each group sat on its own GPU.
    Running statistics are the average over groups; evaluation is plain BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_splits
        if n % g:
            raise ValueError(f"batch of {n} does not split into {g} BN groups")
        running_mean = self.running_mean.repeat(g)
        running_var = self.running_var.repeat(g)
        grouped = x.reshape(n // g, g * c, h, w)
        out = F.batch_norm(
            grouped,
            running_mean,
            running_var,
            self.weight.repeat(g),
            self.bias.repeat(g),
            training=True,
            momentum=self.momentum,
            eps=self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(g, c).mean(0))
            self.running_var.copy_(running_var.view(g, c).mean(0))
            self.num_batches_tracked += 1
        return out.reshape(n, c, h, w)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm over any backend (``torch.nn.SyncBatchNorm`` needs a GPU).

    Per-channel sums, sums of squares and counts are combined with one differentiable
    ``all_reduce``, so the gradient flows through the global statistics.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        xf = x.float()
        dims = [0, *range(2, x.dim())]
        channel_shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device)
        stats = dist_fn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * total / (total - 1).clamp_min(1), self.momentum)
        inv_std = torch.rsqrt(var + self.eps)
        scale = inv_std * self.weight if self.affine else inv_std
        shift = -mean * scale + (self.bias if self.affine else 0)
        return (xf * scale.view(channel_shape) + shift.view(channel_shape)).to(x.dtype)


def convert_batchnorm(module: nn.Module, mode: str, num_splits: int, device: torch.device) -> nn.Module:
    """Swap every ``BatchNorm2d`` for the chosen mode, keeping parameters and statistics.

    ``split``: :class:`SplitBatchNorm` (shuffle-BN in a single process);
    ``sync``: ``torch.nn.SyncBatchNorm`` on GPU, :class:`GlooSyncBatchNorm` otherwise;
    ``local``: unchanged per-rank BatchNorm.
    """
    if mode == "local":
        return module
    if mode == "sync" and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            if mode == "split" and isinstance(child, nn.BatchNorm2d):
                new: nn.Module = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            elif mode == "split":
                continue  # 1-D BN in a head sees whole feature vectors; leave it per-process
            elif mode == "sync":
                new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            else:
                raise ValueError(f"unknown batch-norm mode {mode!r}")
            new.load_state_dict(child.state_dict())
            new.to(child.running_mean.device)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, mode, num_splits, device)
    return module
