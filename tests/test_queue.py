"""The key queue: FIFO with wrap-around, identical on every rank."""

from __future__ import annotations

import torch
from dist_utils import run_ranks

from moco_scale.dist.queue import KeyQueue


def _reference_fifo(initial: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    """A plain Python ring: write row by row, wrapping at the end."""
    rows = [row.clone() for row in initial]
    ptr = 0
    for batch in batches:
        for row in batch:
            rows[ptr] = row.clone()
            ptr = (ptr + 1) % len(rows)
    return torch.stack(rows)


def test_wraps_around_when_size_is_not_a_multiple_of_the_batch() -> None:
    torch.manual_seed(0)
    queue = KeyQueue(10, 4)
    initial = queue.keys.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(10))
    batches = [torch.randn(3, 4) for _ in range(5)]
    for batch in batches:
        queue.enqueue(batch)
    torch.testing.assert_close(queue.keys, _reference_fifo(initial, batches))
    assert int(queue.ptr) == 15 % 10
    assert "keys" in queue.state_dict() and "ptr" in queue.state_dict()


def _check_identical_across_ranks(rank: int, world: int) -> None:
    torch.manual_seed(0)  # the same initial queue everywhere, as the launcher seeds it
    queue = KeyQueue(11, 3)
    initial = queue.keys.clone()
    per_rank = [
        [torch.randn(2, 3, generator=torch.Generator().manual_seed(10 * s + r)) for r in range(world)] for s in range(7)
    ]
    for step in range(7):
        queue.enqueue(per_rank[step][rank])
    expected = _reference_fifo(initial, [torch.cat(per_rank[s]) for s in range(7)])
    torch.testing.assert_close(queue.keys, expected)
    gathered = [torch.empty_like(queue.keys) for _ in range(world)]
    torch.distributed.all_gather(gathered, queue.keys)
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def test_two_ranks_hold_identical_queues() -> None:
    run_ranks(_check_identical_across_ranks, 2)


def test_rejects_batch_larger_than_queue() -> None:
    queue = KeyQueue(4, 2)
    try:
        queue.enqueue(torch.randn(5, 2))
    except ValueError as err:
        assert "exceeds the queue size" in str(err)
    else:
        raise AssertionError("an oversized batch was accepted")
