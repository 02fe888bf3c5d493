"""Batch norm for each ``moco.shuffle_bn``: split BN (shuffle-BN's virtual groups in one process), sync BN on
any backend, and per-rank BN (shuffle-BN across ranks, with the shuffle of ``moco_scale.distributed.shuffle``)."""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from moco_scale.distributed.comm import world_size


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


def convert_batchnorm(
    module: nn.Module, shuffle_bn: str, world_size: int, bn_groups: int, device: torch.device
) -> nn.Module:
    """Swap every ``BatchNorm2d`` for what ``moco.shuffle_bn`` needs, keeping parameters and statistics.

    ``shuffle``: in a single process :class:`SplitBatchNorm` over ``bn_groups`` groups (the shuffle moves
    samples between groups); on several ranks unchanged per-rank BN (the shuffle moves them between ranks);
    ``sync``: ``torch.nn.SyncBatchNorm`` on GPU, :class:`GlooSyncBatchNorm` otherwise (1-D BN too);
    ``none``: unchanged per-rank BN.
    """
    if shuffle_bn not in ("shuffle", "sync", "none"):
        raise ValueError(f"unknown moco.shuffle_bn {shuffle_bn!r}")
    if shuffle_bn == "none" or (shuffle_bn == "shuffle" and world_size > 1):
        return module
    if shuffle_bn == "sync" and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            if shuffle_bn == "sync":
                new: nn.Module = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            elif isinstance(child, nn.BatchNorm2d):
                new = SplitBatchNorm(child.num_features, bn_groups, eps=child.eps, momentum=child.momentum)
            else:
                continue  # 1-D BN in a head sees whole feature vectors; leave it per-process
            new.load_state_dict(child.state_dict())
            new.to(child.running_mean.device)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, shuffle_bn, world_size, bn_groups, device)
    return module
