"""Checkpoint save/load wall time and size on disk through ``moco_scale.checkpoint`` on DeepSpeed.

    python benchmarks/checkpoint_io.py [--archs resnet18,resnet50,resnet50x2] [--world 2] [--zero 0,2]
                                       [--queue 65536] [--repeats 3] [--dir TMPROOT] [--json PATH] [--smoke]

For every architecture and ZeRO stage, ``--world`` gloo ranks are spawned on this machine (one
torch thread each). Each rank builds ``MoCo(build_resnet(arch, width),
MocoConfig(queue_size=K))`` (v2, shuffle-BN), SGD from ``moco_scale.optim.build_optimizer`` and
``DeepSpeedEngine(model, make_optimizer, "fp32", zero, micro_batch=2)``, and runs one training step on
random 2x3x32x32 images so that the momentum buffers exist. Then, ``--repeats`` times:

- ``save``: ``checkpoint.save(engine, run_dir, step, loader_state={}, config={}, keep_last=2)``
  (DeepSpeed's files, each rank's ``rank_*.pt``, the rename and ``latest``; from the third save on
  it also deletes the oldest checkpoint, as training does);
- ``load``: ``checkpoint.load(engine, path)`` of the checkpoint just written.

Each call is timed between two barriers; the figure reported is rank 0's wall time, median over
the repetitions (every rank's samples are in the JSON). The checkpoint folder is then measured
(the sum of its files' sizes and its largest file) and, once, rank 0 ``fsync``s every file of it:
``save`` returns once the bytes are in the page cache, and the fsync time is what getting them
onto the disk costs on top. ``load`` reads a checkpoint that was just written, so it too is
mostly served from the page cache. ``resnet50x2`` is ResNet-50 with ``width=2``. Every
configuration writes into its own temporary folder, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale import checkpoint
from moco_scale.config import MocoConfig
from moco_scale.distributed.comm import free_port, join_local_gloo, shutdown_distributed
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer

try:
    from benchmarks._common import environment, format_table, median, spread, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/checkpoint_io.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, write_json

MICRO_BATCH = 2
IMAGE_SIZE = 32
KEEP_LAST = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--archs", default="resnet18,resnet50,resnet50x2", help="comma-separated; NAMExW = width W")
    parser.add_argument("--world", type=int, default=2, help="gloo ranks per configuration")
    parser.add_argument("--zero", default="0,2", help="comma-separated ZeRO stages")
    parser.add_argument("--queue", type=int, default=65536, help="queue size K")
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads per configuration; median reported")
    parser.add_argument("--dir", default=None, help="where the temporary run folders go (default: the system's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="resnet18, ZeRO 0, K=1024, 1 repetition, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.archs, args.zero, args.queue, args.repeats = "resnet18", "0", 1024, 1
    args.arch_list = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.zero_list = [int(z) for z in args.zero.split(",") if z.strip()]
    return args


def arch_and_width(name: str) -> tuple[str, int]:
    """``resnet50x2`` -> (``resnet50``, 2); a name without an ``xN`` suffix has width 1."""
    base, sep, width = name.rpartition("x")
    if sep and base and width.isdigit():
        return base, int(width)
    return name, 1


def folder_bytes(path: Path) -> tuple[int, int, str, int]:
    """(total bytes, largest file's bytes, its name, file count) of the files under ``path``."""
    sizes = {f.relative_to(path).as_posix(): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    largest = max(sizes, key=sizes.__getitem__)
    return sum(sizes.values()), sizes[largest], largest, len(sizes)


def fsync_folder(path: Path) -> float:
    """Seconds to fsync every file under ``path`` and the folder itself."""
    t0 = time.perf_counter()
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def timed(fn) -> tuple[float, object]:
    """Wall seconds of ``fn()`` between two barriers, and its result."""
    dist.barrier()
    t0 = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - t0, result


def measure(rank: int, world: int, arch: str, zero: int, queue: int, repeats: int, run_dir: str) -> dict:
    """Everything one rank measures for one configuration."""
    base, width = arch_and_width(arch)
    torch.manual_seed(0)  # the same model and queue on every rank
    model = MoCo(
        build_resnet(base, width), MocoConfig(queue_size=queue), world_size=world, cuda_graph_ema=False
    ).train()
    params_query = sum(p.numel() for p in model.encoder_q.parameters())
    if model.predictor is not None:
        params_query += sum(p.numel() for p in model.predictor.parameters())
    params_key = sum(p.numel() for p in model.encoder_k.parameters())
    queue_bytes = model.queue.keys.numel() * model.queue.keys.element_size()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    engine = DeepSpeedEngine(
        model, lambda m: build_optimizer(m, "sgd", lr=0.1), "fp32", zero, micro_batch=MICRO_BATCH, world_size=world
    )

    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(MICRO_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(2)]
    out = engine.train_step(*views, lr=0.1, momentum=0.99, step=0)
    if not torch.isfinite(out.loss):
        raise RuntimeError(f"rank {rank}: the training step gave loss {out.loss.item()}")

    save_s, load_s = [], []
    path = None
    for rep in range(repeats):
        seconds, path = timed(lambda step=rep + 1: checkpoint.save(engine, run_dir, step, {}, {}, keep_last=KEEP_LAST))
        save_s.append(seconds)
        seconds, _ = timed(lambda p=path: checkpoint.load(engine, p))
        load_s.append(seconds)

    result: dict = {"rank": rank, "save_s": save_s, "load_s": load_s}
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        total, largest, largest_name, files = folder_bytes(path)
        result.update(
            params_query=params_query,
            params_key=params_key,
            queue_bytes=queue_bytes,
            module_state_bytes=state_bytes,
            checkpoint_bytes=total,
            largest_file_bytes=largest,
            largest_file=largest_name,
            files=files,
            checkpoints_kept=sorted(p.name for p in checkpoint.checkpoint_root(run_dir).iterdir()),
            fsync_s=fsync_folder(path),
        )
    dist.barrier()
    return result


def worker(rank: int, world: int, port: int, config: dict, out_path: str) -> None:
    join_local_gloo(rank, world, port)
    try:
        result = measure(rank, world, **config)
        everyone: list[dict | None] = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(out_path).write_text(json.dumps(everyone))
    finally:
        shutdown_distributed()


def run_config(args: argparse.Namespace, arch: str, zero: int) -> dict:
    """Spawn the ranks for one configuration in a fresh temporary folder; rank 0's row plus all ranks' times."""
    with tempfile.TemporaryDirectory(prefix="ckpt_io_", dir=args.dir) as tmp:
        out_path = str(Path(tmp) / "ranks.json")
        config = {"arch": arch, "zero": zero, "queue": args.queue, "repeats": args.repeats, "run_dir": tmp + "/run"}
        t0 = time.perf_counter()
        mp.spawn(worker, args=(args.world, free_port(), config, out_path), nprocs=args.world, join=True)
        wall = time.perf_counter() - t0
        per_rank = json.loads(Path(out_path).read_text())
    first = per_rank[0]
    save_s, load_s = median(first["save_s"]), median(first["load_s"])
    size = first["checkpoint_bytes"]
    return {
        "arch": arch,
        "zero": zero,
        "ranks": args.world,
        "queue_size": args.queue,
        "params": first["params_query"] + first["params_key"],
        "params_query": first["params_query"],
        "params_key": first["params_key"],
        "queue_bytes": first["queue_bytes"],
        "module_state_bytes": first["module_state_bytes"],
        "checkpoint_bytes": size,
        "largest_file_bytes": first["largest_file_bytes"],
        "largest_file": first["largest_file"],
        "files": first["files"],
        "checkpoints_kept": first["checkpoints_kept"],
        "save_s": save_s,
        "load_s": load_s,
        "save_mb_per_s": size / 1e6 / save_s,
        "load_mb_per_s": size / 1e6 / load_s,
        "fsync_s": first["fsync_s"],
        "save_spread": spread(first["save_s"]),
        "load_spread": spread(first["load_s"]),
        "save_s_by_rank": [r["save_s"] for r in per_rank],
        "load_s_by_rank": [r["load_s"] for r in per_rank],
        "max_rss_mb_by_rank": [r["max_rss_mb"] for r in per_rank],
        "wall_s_incl_spawn": wall,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    env = environment()
    env["threads"] = 1  # per rank, set in each worker
    print(
        f"checkpoint save/load: {', '.join(args.arch_list)} x ZeRO {args.zero_list}, {args.world} gloo ranks "
        f"(1 thread each), K = {args.queue}, fp32, SGD; median of {args.repeats}; torch {env['torch']}, {env['cpu']}"
    )
    rows, failed = [], []
    for arch in args.arch_list:
        for zero in args.zero_list:
            try:
                row = run_config(args, arch, zero)
            except Exception as exc:  # one configuration failing (e.g. out of memory) should not hide the others
                traceback.print_exc()
                failed.append({"arch": arch, "zero": zero, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{arch} ZeRO {zero}: FAILED ({type(exc).__name__})", flush=True)
                continue
            rows.append(row)
            print(
                f"{arch} ZeRO {zero}: {row['checkpoint_bytes'] / 1e6:.1f} MB in {row['files']} files, save "
                f"{row['save_s']:.2f} s, load {row['load_s']:.2f} s, fsync {row['fsync_s']:.2f} s "
                f"({row['wall_s_incl_spawn']:.0f} s with start-up)",
                flush=True,
            )
    headers = ["arch", "params (q+k) M", "ZeRO", "ranks", "size MB", "save s", "load s", "MB/s"]
    table = [
        [
            r["arch"],
            r["params"] / 1e6,
            r["zero"],
            r["ranks"],
            r["checkpoint_bytes"] / 1e6,
            r["save_s"],
            r["load_s"],
            r["save_mb_per_s"],
        ]
        for r in rows
    ]
    print()
    print(format_table(headers, table))
    print("MB/s = checkpoint size / save time (rank 0, median).")
    details = [
        [
            r["arch"],
            r["zero"],
            r["queue_bytes"] / 1e6,
            r["largest_file_bytes"] / 1e6,
            r["largest_file"],
            r["load_mb_per_s"],
            r["fsync_s"],
            max(r["max_rss_mb_by_rank"]),
        ]
        for r in rows
    ]
    print()
    print(
        format_table(
            ["arch", "ZeRO", "queue MB", "largest file MB", "largest file", "load MB/s", "fsync s", "peak RSS MB"],
            details,
        )
    )
    payload = {
        "benchmark": "checkpoint_io",
        "archs": args.arch_list,
        "zero_stages": args.zero_list,
        "world_size": args.world,
        "backend": "gloo",
        "precision": "fp32",
        "optimizer": "sgd",
        "queue_size": args.queue,
        "micro_batch": MICRO_BATCH,
        "image_size": IMAGE_SIZE,
        "repeats": args.repeats,
        "keep_last": KEEP_LAST,
        "smoke": args.smoke,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "rows": rows,
        "failed": failed,
        "save_s_max": max((r["save_s"] for r in rows), default=None),
        "load_s_max": max((r["load_s"] for r in rows), default=None),
        **env,
    }
    write_json(args.json, payload)
    if failed:
        print(f"{len(failed)} configuration(s) failed: " + "; ".join(f"{f['arch']} ZeRO {f['zero']}" for f in failed))
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
