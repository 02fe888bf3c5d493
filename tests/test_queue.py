"""The key queue: FIFO with wrap-around, identical on every rank; and the sharded queue, whose loss,
gradients and contents equal the replicated queue's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from torch import nn

from moco_scale.moco.queue import KeyQueue, ShardedKeyQueue

ROOT = Path(__file__).resolve().parent.parent


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


TEMPERATURE = 0.2


def _reference_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain MoCo InfoNCE in one process: positive first, then every queued key; label 0."""
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / TEMPERATURE
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == 0).float().mean()


def _check_sharded_loss_and_gradients(rank: int, world: int) -> None:
    batch, dim, size = 6, 8, 24
    torch.manual_seed(0)  # every rank: the same encoder, data and full queue
    encoder = nn.Linear(5, dim)
    inputs = torch.randn(world * batch, 5)
    full_queue = F.normalize(torch.randn(size, dim), dim=1)
    with torch.no_grad():  # keys near half the queries, so the positive sometimes wins
        keys = F.normalize(encoder(inputs) + torch.randn(world * batch, dim) * torch.rand(world * batch, 1) * 3, dim=1)
    own = slice(rank * batch, (rank + 1) * batch)

    queue = ShardedKeyQueue(size, dim)
    assert queue.shard.shape == (size // world, dim) and queue.size == size
    queue.shard.copy_(full_queue.view(world, size // world, dim)[rank])
    loss, accuracy = queue.info_nce(F.normalize(encoder(inputs[own]), dim=1), keys[own], TEMPERATURE)
    loss.backward()
    grads = [p.grad.clone() for p in encoder.parameters()]

    encoder.zero_grad()
    ref_loss, ref_accuracy = _reference_loss(F.normalize(encoder(inputs[own]), dim=1), keys[own], full_queue)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(accuracy, ref_accuracy)
    for got, want in zip(grads, (p.grad for p in encoder.parameters()), strict=True):
        torch.testing.assert_close(got, want)
    # the data exercises both outcomes on some rank, so the accuracy check can fail
    outcomes = torch.tensor([float(0 < ref_accuracy < 1)])
    torch.distributed.all_reduce(outcomes)
    assert outcomes.item() > 0


def test_sharded_queue_loss_and_gradients_equal_replicated() -> None:
    """Each rank's loss, accuracy and query-encoder gradient equal plain cross-entropy against the full queue."""
    run_ranks(_check_sharded_loss_and_gradients, 2)


def test_sharded_queue_on_one_rank_is_the_plain_loss() -> None:
    torch.manual_seed(0)
    queue = ShardedKeyQueue(10, 4)
    q = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    k = F.normalize(torch.randn(3, 4), dim=1)
    loss, _ = queue.info_nce(q, k, TEMPERATURE)
    (grad,) = torch.autograd.grad(loss, q)
    ref_loss, _ = _reference_loss(q, k, queue.shard)
    (ref_grad,) = torch.autograd.grad(ref_loss, q)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def _rows(keys: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(row.tolist()) for row in keys)


def _check_shards_hold_the_replicated_keys(rank: int, world: int) -> None:
    size, dim, batch, steps = 16, 3, 2, 9  # K a multiple of the global batch: 4 steps fill it
    torch.manual_seed(0)
    replicated, sharded = KeyQueue(size, dim), ShardedKeyQueue(size, dim)
    for step in range(steps):
        local = torch.randn(batch, dim, generator=torch.Generator().manual_seed(100 * step + rank))
        replicated.enqueue(local)
        sharded.enqueue(local)
        union = [torch.empty_like(sharded.shard) for _ in range(world)]
        torch.distributed.all_gather(union, sharded.shard)
        if step + 1 >= size // (world * batch):
            assert _rows(torch.cat(union)) == _rows(replicated.keys), f"step {step}"
    assert int(sharded.ptr) == steps * batch % (size // world)


def test_sharded_queue_union_equals_replicated_queue() -> None:
    run_ranks(_check_shards_hold_the_replicated_keys, 2)


def test_sharded_queue_rejects_a_batch_larger_than_its_slice() -> None:
    with pytest.raises(ValueError, match="exceeds this rank's queue slice"):
        ShardedKeyQueue(4, 2).enqueue(torch.randn(5, 2))


ALLOW_LONGER = "--checkpoint.allow_changes=train.max_steps"  # a longer run: its lr schedule differs from here on


@pytest.mark.slow
def test_torchrun_two_ranks_sharded_queue_trains_and_resumes(tmp_path: Path) -> None:
    """The demo on 2 ranks with moco.shard_queue=true; each rank checkpoints its own slice and gets it back."""
    run_dir = tmp_path / "run"

    def launch(steps: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += [str(ROOT / "launchers" / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
        cmd += ["--moco.shard_queue=true", f"--train.max_steps={steps}", "--train.log_every=1"]
        cmd += [f"--train.run_dir={run_dir}", "--train.progress=false", "--eval.every_steps=0", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    assert "done: 3 steps" in launch(3, "--checkpoint.every_steps=3").stdout
    saved = run_dir / "checkpoints" / "step_00000003"
    slices = [torch.load(saved / f"rank_{r:05d}.pt", weights_only=False)["rank_local"]["queue"] for r in range(2)]
    assert all(s["shard"].shape == (128, 128) and int(s["ptr"]) == 3 * 32 % 128 for s in slices)
    assert not torch.equal(slices[0]["shard"], slices[1]["shard"])
    assert "done: 4 steps" in launch(4, "--checkpoint.resume=auto", "--checkpoint.every_steps=4", ALLOW_LONGER).stdout
    for r, before in enumerate(slices):  # step 4 overwrote 32 rows of the slice this rank restored
        after = torch.load(run_dir / "checkpoints" / "step_00000004" / f"rank_{r:05d}.pt", weights_only=False)
        kept = torch.ones(128, dtype=torch.bool)
        kept[96:] = False
        assert torch.equal(after["rank_local"]["queue"]["shard"][kept], before["shard"][kept])
        assert not torch.equal(after["rank_local"]["queue"]["shard"][~kept], before["shard"][~kept])
