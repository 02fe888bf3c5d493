"""Gradient averaging across ranks that overlaps the backward pass, for unsharded (ZeRO-0) training.

Parameters are grouped into buckets of about ``bucket_mb`` (and of one dtype and device) in reverse
registration order (roughly the order backward produces their gradients); each bucket has one persistent flat
buffer, and every gradient is a view into its bucket's buffer (as DDP's ``gradient_as_bucket_view``):
:meth:`attach` zeroes the buffers and points ``param.grad`` at the views before backward, so autograd
accumulates straight into them and no gradient exists twice. When the last gradient of a bucket has been
accumulated, an asynchronous ``all_reduce`` of the buffer starts while autograd goes on with the earlier
layers. Reductions start in bucket order on every rank (a bucket that fills early waits for the ones before
it), so the collectives match even if ranks finish their gradients in different orders. :meth:`wait` finishes
them and divides by the world size in place. A gradient that autograd made on its own (no :meth:`attach`, or
``grad`` set to None since) is copied into its view first. The buffers are allocated once, so no step pays for
fresh pages (a 46 MB flatten per step faulted them in under DeepSpeed's ZeRO-0 path).

Every rank must produce the same set of gradients each step (true for MoCo: the whole query side
is used); a bucket still incomplete when :meth:`wait` is called is reduced there, its missing
gradients as zeros.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class OverlappedGradientAverager:
    """Averages the gradients of ``params`` over the default process group as backward produces them."""

    def __init__(self, params: list[nn.Parameter], bucket_mb: float = 25.0):
        self.world_size = dist.get_world_size()
        cap = int(bucket_mb * 2**20)
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed(params):
            bucket = self.buckets[-1]
            full = size + p.numel() * p.element_size() > cap
            if bucket and (full or (p.dtype, p.device) != (bucket[0].dtype, bucket[0].device)):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.buffers = [
            torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device) for b in self.buckets
        ]
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        for bucket, buffer in zip(self.buckets, self.buffers, strict=True):
            offset = 0
            for p in bucket:
                self.views[p] = _strided_like(buffer, offset, p)
                offset += p.numel()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.pending = [len(b) for b in self.buckets]
        self.handles: list[dist.Work] = []
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    @torch.no_grad()
    def attach(self) -> None:
        """Zero the buckets and make every ``param.grad`` its view, for the next backward to accumulate into."""
        for buffer in self.buffers:
            buffer.zero_()
        for p, view in self.views.items():
            p.grad = view

    def _ready(self, param: nn.Parameter) -> None:
        self.pending[self.bucket_of[param]] -= 1
        while len(self.handles) < len(self.buckets) and self.pending[len(self.handles)] == 0:
            self._launch(len(self.handles))

    @torch.no_grad()
    def _launch(self, index: int) -> None:
        for p in self.buckets[index]:
            view = self.views[p]
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view
        self.handles.append(dist.all_reduce(self.buffers[index], async_op=True))

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every reduction and leave the averaged gradients in ``param.grad`` (views of the buckets)."""
        for index in range(len(self.handles), len(self.buckets)):  # some gradient never came: reduce what is there
            self._launch(index)
        for handle, buffer in zip(self.handles, self.buffers, strict=True):
            handle.wait()
            buffer.div_(self.world_size)
        self.handles.clear()
        self.pending = [len(b) for b in self.buckets]


def _strided_like(buffer: torch.Tensor, offset: int, param: torch.Tensor) -> torch.Tensor:
    """``param.numel()`` elements of ``buffer`` from ``offset``, laid out with ``param``'s strides (e.g.
    channels-last) when they are dense, so autograd's gradient layout matches the parameter's."""
    flat = buffer[offset : offset + param.numel()]
    span = 1  # dense: the strides, sorted, step through the sizes with no gap or overlap
    for size, stride in sorted(zip(param.shape, param.stride(), strict=True), key=lambda dim: dim[1]):
        if size != 1 and stride != span:
            return flat.view(param.shape)
        span *= size
    return flat.as_strided(param.shape, param.stride())
