"""Shuffle-BN's key round trip: one ``all_to_all`` each way against fb/moco's all_gather + broadcast.

    python benchmarks/batchnorm.py [--batch 64] [--image-size 64] [--steps N] [--json PATH] [--smoke]

Spawns 2 gloo ranks on this machine (one torch thread each) and times, per rank, moving a
batch of B images (B, 3, S, S) to their shuffled owners and back; no encoder runs in between,
since it would cost the same in both, so only the communication mechanism is measured:

- ``ours``: ``plan_for_step`` (every rank derives the same permutation from a shared seed),
  ``shuffle`` and ``unshuffle`` from ``moco_scale.distributed.shuffle``: one ``all_to_all`` each way;
- ``reference``, written here after fb/moco's ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``:
  all_gather the global batch, rank 0 draws a permutation and broadcasts it, each rank keeps its
  slice; on the way back all_gather again and keep the slice of the inverse permutation. (It
  gathers straight into one buffer with ``all_gather_single``, sparing the concatenation
  fb/moco's ``concat_all_gather`` does, so the reference is if anything a little favoured.)

Bytes per rank per step are counted analytically, two ways. "Buffer" counts every row a
collective is handed or hands back, a rank's own rows included: ours sends B rows and receives
B rows each way; an all_gather hands this rank's B rows to each of the W ranks and returns W*B
rows, twice, plus the W*B int64 permutation. "Wire" counts only rows that cross to another
process: for ours, from the plans actually used (in expectation (W-1)/W of the rows); for the
reference, (W-1)*B rows out and in per all_gather, plus the permutation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.distributed import shuffle
from moco_scale.distributed.comm import free_port, shutdown_distributed

try:
    from benchmarks._common import environment, format_table, median, spread, time_interleaved, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/batchnorm.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, time_interleaved, write_json

WORLD = 2
SEED = 1234
PERM_BYTES = 8  # torch.randperm gives int64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=64, help="images per rank (B)")
    parser.add_argument("--image-size", type=int, default=64, help="image side (S)")
    parser.add_argument("--steps", type=int, default=20, help="timed round trips per method per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed round trips per method first")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions; the median is reported")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps: a few seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.image_size, args.steps, args.warmup, args.repeats = 8, 16, 2, 1, 2
    return args


class Reference:
    """fb/moco's shuffle: gather everything, broadcast rank 0's permutation, index a slice."""

    def __init__(self, rank: int, world: int, batch: int) -> None:
        self.rank, self.world, self.batch = rank, world, batch
        self.generator = torch.Generator().manual_seed(SEED)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_single(out, x.contiguous())
        return out

    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        everyone = self._gather(x)
        total = everyone.shape[0]
        if self.rank == 0:
            perm = torch.randperm(total, generator=self.generator)
        else:
            perm = torch.empty(total, dtype=torch.long)
        dist.broadcast(perm, src=0)
        return everyone[perm.view(self.world, -1)[self.rank]], perm

    def unshuffle(self, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        everyone = self._gather(y)
        inverse = torch.argsort(perm)
        return everyone[inverse.view(self.world, -1)[self.rank]]


def byte_counts(batch: int, row_bytes: int, world: int, own_rows_kept: float) -> dict[str, dict[str, float]]:
    """Bytes per rank per step (sent + received). ``own_rows_kept``: mean rows a rank keeps per direction."""
    perm = world * batch * PERM_BYTES
    return {
        "ours": {
            "buffer": 2 * (batch + batch) * row_bytes,
            "wire": 2 * 2 * (batch - own_rows_kept) * row_bytes,
            "wire_expected": 2 * 2 * batch * row_bytes * (world - 1) / world,
        },
        "reference": {
            "buffer": 2 * (world * batch + world * batch) * row_bytes + perm,
            "wire": 2 * 2 * (world - 1) * batch * row_bytes + perm,
        },
    }


def check(x: torch.Tensor, rank: int, world: int, batch: int) -> None:
    """Both round trips give back ``x``; ours puts on each rank the rows its permutation says."""
    plan = shuffle.plan_for_step(SEED, 0, batch, x.device)
    shuffled = shuffle.shuffle(x, plan)
    everyone = torch.empty((world * batch, *x.shape[1:]), dtype=x.dtype)
    dist.all_gather_single(everyone, x)
    perm = shuffle.global_permutation(SEED, 0, world * batch)
    if not torch.equal(shuffled, everyone[perm[rank * batch : (rank + 1) * batch]]):
        raise AssertionError(f"rank {rank}: shuffle() does not match the global permutation")
    if not torch.equal(shuffle.unshuffle(shuffled, plan), x):
        raise AssertionError(f"rank {rank}: unshuffle(shuffle(x)) != x")
    reference = Reference(rank, world, batch)
    y, p = reference.shuffle(x)
    if not torch.equal(reference.unshuffle(y, p), x):
        raise AssertionError(f"rank {rank}: the reference round trip does not give x back")


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch, size = args.batch, args.image_size
        device = torch.device("cpu")
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(rank))
        check(x, rank, world, batch)

        steps = itertools.count(1)  # a new permutation every round trip, as in training

        def ours() -> None:
            plan = shuffle.plan_for_step(SEED, next(steps), batch, device)
            shuffle.unshuffle(shuffle.shuffle(x, plan), plan)

        reference = Reference(rank, world, batch)

        def ref() -> None:
            y, perm = reference.shuffle(x)
            reference.unshuffle(y, perm)

        plan_steps = itertools.count(1)

        def plan_only() -> None:
            shuffle.plan_for_step(SEED, next(plan_steps), batch, device)

        methods = {"ours": ours, "reference": ref, "ours: plan_for_step alone": plan_only}
        samples = time_interleaved(methods, args.steps, args.warmup, args.repeats, before_repeat=dist.barrier)

        # Rows this rank keeps (sends to itself) per direction, averaged over many permutations.
        kept = [
            shuffle.make_plan(shuffle.global_permutation(SEED, s, world * batch), rank, world, batch, device)
            for s in range(1, 201)
        ]
        own_rows_kept = sum(p.send_counts[rank] + p.recv_counts[rank] for p in kept) / (2 * len(kept))

        everything: list[dict | None] = [None] * world
        dist.all_gather_object(everything, {"rank": rank, "samples": samples, "own_rows_kept": own_rows_kept})
        if rank == 0:
            Path(out_path).write_text(json.dumps(everything))
    finally:
        shutdown_distributed()


def summarise(args: argparse.Namespace, per_rank: list[dict]) -> dict[str, object]:
    names = list(per_rank[0]["samples"])
    ms_by_rank = {name: [median(r["samples"][name]) for r in per_rank] for name in names}
    # A step is as slow as its slowest rank.
    ms = {name: max(values) for name, values in ms_by_rank.items()}
    row_bytes = 3 * args.image_size * args.image_size * torch.finfo(torch.float32).bits // 8
    own_rows_kept = sum(r["own_rows_kept"] for r in per_rank) / len(per_rank)
    counts = byte_counts(args.batch, row_bytes, WORLD, own_rows_kept)
    return {
        "ms": ms,
        "ms_by_rank": ms_by_rank,
        "ms_samples_by_rank": {name: [r["samples"][name] for r in per_rank] for name in names},
        "spread_by_rank": {name: [spread(r["samples"][name]) for r in per_rank] for name in names},
        "ratio_vs_reference": ms["reference"] / ms["ours"],
        "row_bytes": row_bytes,
        "own_rows_kept_per_direction": own_rows_kept,
        "bytes_per_step": {name: c["buffer"] for name, c in counts.items()},
        "wire_bytes_per_step": {name: c["wire"] for name, c in counts.items()},
        "wire_bytes_per_step_expected_ours": counts["ours"]["wire_expected"],
        "bytes_ratio_reference_vs_ours": counts["reference"]["buffer"] / counts["ours"]["buffer"],
        "wire_bytes_ratio_reference_vs_ours": counts["reference"]["wire"] / counts["ours"]["wire"],
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "ranks.json")
        mp.spawn(worker, args=(WORLD, port, args, out_path), nprocs=WORLD, join=True)
        per_rank = json.loads(Path(out_path).read_text())
    result = summarise(args, per_rank)
    env = environment()
    env["threads"] = 1  # per rank, set in each worker
    ms, ms_by_rank = result["ms"], result["ms_by_rank"]
    buffer_bytes, wire_bytes = result["bytes_per_step"], result["wire_bytes_per_step"]
    print(
        f"shuffle-BN round trip: {WORLD} gloo ranks x {args.batch} images of 3x{args.image_size}x{args.image_size} "
        f"fp32 ({result['row_bytes'] * args.batch / 1e6:.2f} MB per rank); torch {env['torch']}, 1 thread per rank, "
        f"{env['cpu']}; {args.repeats} x {args.steps} steps after {args.warmup} warm-up"
    )
    headers = ["method", "ms/step (slowest rank)", *(f"rank {r} ms" for r in range(WORLD))]
    headers += ["MB/step buffer", "MB/step wire", "ref time / time"]
    rows = []
    for name in ms:
        row = [name, ms[name], *ms_by_rank[name]]
        if name in buffer_bytes:
            row += [buffer_bytes[name] / 1e6, wire_bytes[name] / 1e6, ms["reference"] / ms[name]]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    print(format_table(headers, rows))
    print(
        f"ratio_vs_reference = {result['ratio_vs_reference']:.3f}; bytes reference/ours: buffer "
        f"{result['bytes_ratio_reference_vs_ours']:.2f}x, wire {result['wire_bytes_ratio_reference_vs_ours']:.2f}x "
        f"(ours keeps {result['own_rows_kept_per_direction']:.1f} of {args.batch} rows on-rank per direction)"
    )
    payload = {
        "benchmark": "shuffle_bn",
        "world_size": WORLD,
        "backend": "gloo",
        "batch": args.batch,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        **result,
        **env,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
