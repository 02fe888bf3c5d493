"""The MoCo dictionary: a FIFO ring of the K most recent keys, identical on every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moco_scale.dist.comm import all_gather_concat


class KeyQueue(nn.Module):
    """A ring buffer of ``size`` L2-normalised keys of width ``dim``.

    Every rank enqueues the keys gathered from all ranks in rank order, so the queues stay
    identical without any broadcast. ``size`` need not be a multiple of the global batch: the
    write position wraps around. The queue and its pointer are buffers, so they are
    checkpointed with the module.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, local_keys: torch.Tensor) -> None:
        """Append every rank's ``local_keys``; the oldest keys are overwritten."""
        keys = all_gather_concat(local_keys.detach().to(self.keys.dtype))
        if keys.shape[0] > self.size:
            raise ValueError(f"global batch of {keys.shape[0]} keys exceeds the queue size {self.size}")
        slots = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys.index_copy_(0, slots, keys)
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)
