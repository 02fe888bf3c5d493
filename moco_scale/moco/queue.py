"""The MoCo dictionary: a FIFO ring of the K most recent keys, identical on every rank
(:class:`KeyQueue`), or cut into one slice per rank (:class:`ShardedKeyQueue`). Both have one
interface: ``enqueue(keys)``, ``undo_enqueue()``, ``size`` and ``info_nce(q, k, T)``."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco_scale.distributed.comm import (
    all_gather_concat,
    all_gather_with_grad,
    all_reduce_sum_with_grad,
    rank,
    world_size,
)
from moco_scale.moco.loss import queue_info_nce
from moco_scale.models.init import initialise_from_torch_seed


class _Ring(nn.Module):
    """A FIFO ring of keys with a write pointer (buffer ``ptr``), whose last write can be undone: a skipped
    step takes its keys back."""

    def __init__(self) -> None:
        super().__init__()
        self._undo: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _write(self, ring: torch.Tensor, keys: torch.Tensor) -> None:
        """Write ``keys`` into ``ring`` at the pointer, wrapping around, and advance it."""
        slots = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % ring.shape[0]
        self._undo = (ring, slots, ring[slots], self.ptr.clone())
        ring.index_copy_(0, slots, keys)
        self.ptr.copy_((self.ptr + keys.shape[0]) % ring.shape[0])

    @staticmethod
    def init_rule(module: nn.Module, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> bool:
        """K random unit keys (the papers' initial queue), the pointer at 0; a sharded queue takes its rank's
        slice of the same K keys, so the slices of all ranks are the replicated queue."""
        if not isinstance(module, _Ring):
            return False
        ring = "shard" if "shard" in tensors else "keys"
        dim = tensors[ring].shape[1]
        keys = F.normalize(torch.randn(module.size, dim, generator=generator), dim=1)
        own = tensors[ring].shape[0]
        tensors[ring].copy_(keys[rank() * own : (rank() + 1) * own] if ring == "shard" else keys)
        tensors["ptr"].zero_()
        return True

    def undo_enqueue(self) -> None:
        """Put back the keys and the pointer that the last enqueue overwrote (once)."""
        if self._undo is not None:
            ring, slots, overwritten, ptr = self._undo
            ring.index_copy_(0, slots, overwritten)
            self.ptr.copy_(ptr)
            self._undo = None


class KeyQueue(_Ring):
    """A ring buffer of ``size`` L2-normalised keys of width ``dim``.

    Every rank enqueues the keys gathered from all ranks in rank order, so the queues stay
    identical without any broadcast. ``size`` need not be a multiple of the global batch: the
    write position wraps around. The queue and its pointer are buffers, so they are
    checkpointed with the module.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.empty(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        initialise_from_torch_seed(self, [self.init_rule])

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, local_keys: torch.Tensor) -> None:
        """Append every rank's ``local_keys``; the oldest keys are overwritten."""
        keys = all_gather_concat(local_keys.detach().to(self.keys.dtype))
        if keys.shape[0] > self.size:
            raise ValueError(f"global batch of {keys.shape[0]} keys exceeds the queue size {self.size}")
        self._write(self.keys, keys)

    def info_nce(self, q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each query's positive key ``k`` against the K queued keys, and the accuracy."""
        return queue_info_nce(q, k, self.keys.clone(), temperature)  # clone: enqueue overwrites the ring


def distributed_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise logsumexp over the columns of every rank's ``logits`` together, and the row-wise maximum.

    Every rank holds the same rows and its own columns. The maxima are reduced first (MAX, no
    gradient: the shift cancels), then each rank's sum of ``exp(logits - max)`` is summed over
    ranks by a differentiable all-reduce, so each rank's ``logits`` get the gradient
    ``softmax * upstream`` summed over the losses of all ranks.
    """
    row_max = logits.detach().amax(dim=1)
    if world_size() > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    partial = torch.exp(logits - row_max[:, None]).sum(dim=1)
    return row_max + all_reduce_sum_with_grad(partial).log(), row_max


class ShardedKeyQueue(_Ring):
    """The K-key dictionary cut into W slices: each rank holds ``size / world_size`` keys.

    Each rank enqueues only its own keys into its own slice (no gather), so slice r is a FIFO of
    rank r's most recent keys. When K is a multiple of the global batch the union of the slices
    is exactly the set of keys a :class:`KeyQueue` of size K would hold (the last K / global-batch
    steps of every rank); otherwise the two differ only in which keys of the oldest, partly
    overwritten step survive.

    :meth:`info_nce` is MoCo's loss against all K keys: the queries of every rank are gathered,
    each rank scores them against its slice, the softmax denominator comes from
    :func:`distributed_logsumexp`, and each rank keeps its own queries' rows, whose positive logit
    only it holds. The loss and the gradient of each rank's queries equal those of the replicated
    queue. Each rank starts with its own slice of one draw of K keys (``init_rule``). The slice differs
    between ranks, so a checkpoint stores it per rank (``rank_local``).
    """

    rank_local = True  # each rank's slice is its own: checkpoints store it per rank

    def __init__(self, size: int, dim: int):
        super().__init__()
        world = world_size()
        if size % world:
            raise ValueError(f"queue size {size} is not divisible by the {world} ranks")
        self.register_buffer("shard", torch.empty(size // world, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        initialise_from_torch_seed(self, [self.init_rule])  # the same seed on every rank, distinct slices

    @property
    def size(self) -> int:
        """K over all ranks."""
        return self.shard.shape[0] * world_size()

    @torch.no_grad()
    def enqueue(self, local_keys: torch.Tensor) -> None:
        """Append this rank's ``local_keys`` to its slice; the oldest keys are overwritten."""
        keys = local_keys.detach().to(self.shard.dtype)
        slice_size = self.shard.shape[0]
        if keys.shape[0] > slice_size:
            raise ValueError(f"batch of {keys.shape[0]} keys exceeds this rank's queue slice of {slice_size}")
        self._write(self.shard, keys)

    def info_nce(self, q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each query's positive key ``k`` against the K queued keys of all ranks,
        and the instance-discrimination accuracy (ties go to the positive, as with argmax)."""
        positive = (q * k).sum(dim=1) / temperature
        queries = all_gather_with_grad(q)
        negatives = queries @ self.shard.clone().T / temperature  # clone: enqueue overwrites the slice
        lse_all, max_all = distributed_logsumexp(negatives)
        own = slice(rank() * q.shape[0], (rank() + 1) * q.shape[0])
        lse = torch.logaddexp(positive, lse_all[own])
        accuracy = (positive >= max_all[own]).float().mean()
        return (lse - positive).mean(), accuracy
