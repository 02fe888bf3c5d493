"""The sharded key queue against the replicated one: queue memory per rank and loss + enqueue time against K.

    python benchmarks/sharded_queue.py [--ks 65536,1048576,4194304] [--dim 128] [--batch 64] [--json PATH] [--smoke]

On 2 gloo ranks (one torch thread each) it times one MoCo queue step per rank, without the
encoders: the InfoNCE loss of B normalised queries against their keys and the K queued keys,
its backward to the queries, and the enqueue of the keys.

- ``replicated``: :class:`KeyQueue`, every rank holds all K keys; the loss as ``KeyQueue.info_nce`` computes it.
- ``sharded``: :class:`ShardedKeyQueue`, every rank holds K / 2 keys; the queries are gathered and
  the softmax denominator is a distributed logsumexp (``ShardedKeyQueue.info_nce``).

Every (K, method) runs in a fresh pair of processes, ``--repeats`` times, the methods alternating,
so each figure of peak memory is that method's alone and slow drift of the machine falls on both.
Memory per rank: the queue's buffers (exact), and the peak resident set above the one before the
queue was built (``ru_maxrss``), which adds the step's transients: a (B, K) logit matrix and its
gradients on either path, since the sharded path scores all W*B queries against K / W keys.
A configuration whose peak, extrapolated linearly from the same method at a smaller K, would not
fit in ``--mem-budget-gib`` for both ranks together is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moco_scale.distributed.comm import free_port, join_local_gloo, shutdown_distributed
from moco_scale.moco.queue import KeyQueue, ShardedKeyQueue

try:
    from benchmarks._common import environment, format_table, median, spread, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/sharded_queue.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, write_json

WORLD = 2
TEMPERATURE = 0.2
METHODS = ("replicated", "sharded")
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ks", default="65536,1048576,4194304", help="queue sizes K, comma-separated")
    parser.add_argument("--dim", type=int, default=128, help="key width d")
    parser.add_argument("--batch", type=int, default=64, help="queries per rank (B)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process first")
    parser.add_argument("--repeats", type=int, default=3, help="fresh process pairs per (K, method); median")
    parser.add_argument("--mem-budget-gib", type=float, default=14.0, help="both ranks' peak must fit in this")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step: a few seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ks, args.dim, args.batch, args.steps, args.warmup, args.repeats = "1024", 16, 8, 1, 1, 1
    args.ks = [int(k) for k in args.ks.split(",")]
    return args


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / MIB


def replicated_step(queue: KeyQueue, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The v1/v2 loss with the replicated queue, then the enqueue."""
    loss, _ = queue.info_nce(q, k, TEMPERATURE)
    queue.enqueue(k)
    return loss


def sharded_step(queue: ShardedKeyQueue, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    loss, _ = queue.info_nce(q, k, TEMPERATURE)
    queue.enqueue(k)
    return loss


def worker(rank: int, port: int, method: str, size: int, args: argparse.Namespace, out_path: str) -> None:
    join_local_gloo(rank, WORLD, port)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(rank)
        batches = [
            [F.normalize(torch.randn(args.batch, args.dim, generator=generator), dim=1) for _ in range(2)]
            for _ in range(args.warmup + args.steps)
        ]
        before = resident_mib()
        queue = KeyQueue(size, args.dim) if method == "replicated" else ShardedKeyQueue(size, args.dim)
        step = replicated_step if method == "replicated" else sharded_step
        queue_mib = sum(b.numel() * b.element_size() for b in queue.buffers()) / MIB
        times = []
        for i, (q, k) in enumerate(batches):
            q = q.clone().requires_grad_()
            dist.barrier()
            start = time.perf_counter()
            step(queue, q, k).backward()
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        everything: list[dict | None] = [None] * WORLD
        dist.all_gather_object(
            everything, {"ms": sum(times) / len(times), "queue_mib": queue_mib, "peak_mib": peak_mib}
        )
        if rank == 0:
            Path(out_path).write_text(json.dumps(everything))
    finally:
        shutdown_distributed()


def run_pair(method: str, size: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "ranks.json")
        mp.spawn(worker, args=(free_port(), method, size, args, out_path), nprocs=WORLD, join=True)
        return json.loads(Path(out_path).read_text())


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    budget_mib = args.mem_budget_gib * 1024
    results: dict[str, dict[str, dict]] = {method: {} for method in METHODS}
    last_peak: dict[str, tuple[int, float]] = {}  # method -> (K, peak MiB per rank) at the largest K run so far
    for size in args.ks:
        fits = {}
        for method in METHODS:
            predicted = last_peak[method][1] * size / last_peak[method][0] if method in last_peak else 0.0
            fits[method] = WORLD * predicted <= budget_mib
            if not fits[method]:
                results[method][str(size)] = {"skipped": True, "predicted_peak_mib": predicted}
        samples: dict[str, list[list[dict]]] = {m: [] for m in METHODS if fits[m]}
        for _ in range(args.repeats):
            for method in samples:
                samples[method].append(run_pair(method, size, args))
        for method, runs in samples.items():
            ms = [max(r["ms"] for r in ranks) for ranks in runs]  # a step is as slow as its slowest rank
            peak = max(r["peak_mib"] for ranks in runs for r in ranks)
            last_peak[method] = (size, peak)
            results[method][str(size)] = {
                "skipped": False,
                "ms": median(ms),
                "ms_samples": ms,
                "spread": spread(ms),
                "queue_mib_per_rank": runs[0][0]["queue_mib"],
                "peak_mib_per_rank": peak,
            }
    env = environment()
    env["threads"] = 1  # per rank, set in each worker
    print(
        f"queue step (loss + backward to the queries + enqueue): {WORLD} gloo ranks x B={args.batch}, d={args.dim}, "
        f"fp32; torch {env['torch']}, 1 thread per rank, {env['cpu']}; median of {args.repeats} process pairs x "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    headers = ["K", "method", "queue MiB/rank", "peak MiB/rank", "ms/step", "spread", "replicated ms / sharded ms"]
    rows = []
    ratios = {}
    for size in args.ks:
        rep, sha = results["replicated"][str(size)], results["sharded"][str(size)]
        if not (rep["skipped"] or sha["skipped"]):
            ratios[str(size)] = rep["ms"] / sha["ms"]
        for method, entry in (("replicated", rep), ("sharded", sha)):
            if entry["skipped"]:
                rows.append(
                    [size, f"{method} (skipped: ~{entry['predicted_peak_mib']:.0f} MiB/rank)", "-", "-", "-", "-", "-"]
                )
                continue
            ratio = ratios.get(str(size), "-") if method == "sharded" else "-"
            rows.append(
                [
                    size,
                    method,
                    entry["queue_mib_per_rank"],
                    entry["peak_mib_per_rank"],
                    entry["ms"],
                    entry["spread"],
                    ratio,
                ]
            )
    print(format_table(headers, rows))
    measured = [k for k in map(str, args.ks) if k in ratios]
    payload = {
        "benchmark": "sharded_queue",
        "world_size": WORLD,
        "backend": "gloo",
        "ks": args.ks,
        "dim": args.dim,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "mem_budget_gib": args.mem_budget_gib,
        "smoke": args.smoke,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "results": results,
        "ratio_replicated_vs_sharded": ratios,
        # the largest K both methods ran at: replicated time / sharded time
        "ratio_at_largest_k": ratios[measured[-1]] if measured else 0.0,
        **env,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
