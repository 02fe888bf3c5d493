"""The key shuffle of shuffle-BN over one ``all_to_all``.

Shuffle-BN (MoCo v1/v2) stops the key encoder's BN statistics from leaking which keys match
which queries. Across W ranks, the global key batch is permuted by a permutation that every
rank derives from a shared seed, so nothing is broadcast: one ``all_to_all`` sends each rank's
B keys to where the permutation puts them (each rank sends and receives exactly B rows), the
keys are encoded, and the inverse ``all_to_all`` brings them home. In one process the
permutation is local, and :class:`moco_scale.moco.batchnorm.SplitBatchNorm` gives G virtual
groups their own statistics so that shuffling still matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

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
