"""Per-rank memory of MoCo v2 training under each backend: ResNet-50 x1/x2/x4, DeepSpeed ZeRO-0/2/3 and FSDP2.

    python benchmarks/memory.py [--archs resnet50x1,resnet50x2,resnet50x4] [--backends zero0,zero2,zero3,fsdp]
                                [--image-size 32] [--batch 2] [--json PATH] [--smoke]

Every (arch, backend) runs in a fresh pair of gloo ranks on the CPU (one torch thread each), at a
small input size, so the figures are the model state's: parameters of both encoders, gradients,
optimizer state and the backend's own buffers (DeepSpeed's flat fp32 master and gradient
partitions), with small activations.

Per rank it reports
- ``params_local_mib``: the bytes of the parameters this rank holds (both encoders, local shards);
- ``train_peak_mib``: the peak resident set while training (sampled every 2 ms over the steps,
  which include the first optimizer step that allocates its state) above the resident set of
  the bare process before the model was built;
- ``init_peak_mib``: the peak resident set up to the end of the engine's set-up, above the same
  base: the model is built whole on every rank before the backend shards it (no meta-device or
  ``zero.Init`` construction yet), so this is where a model too large for one rank fails.

A configuration whose ZeRO-0 estimate (5 copies of the query encoder's fp32 parameters, per rank,
2 ranks) exceeds ``--mem-budget-gib`` is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import tempfile
import threading
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.config import MocoConfig
from moco_scale.distributed.comm import free_port, join_local_gloo, shutdown_distributed
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer

try:
    from benchmarks._common import environment, format_table, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/memory.py``: the script's folder is on sys.path
    from _common import environment, format_table, write_json

WORLD = 2
MIB = 2**20
ARCHS = {"resnet18": ("resnet18", 1), "resnet50x1": ("resnet50", 1), "resnet50x2": ("resnet50", 2)}
ARCHS["resnet50x4"] = ("resnet50", 4)
BACKENDS = ("zero0", "zero2", "zero3", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--archs", default="resnet50x1,resnet50x2,resnet50x4", help=f"comma-separated: {list(ARCHS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated: {list(BACKENDS)}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--steps", type=int, default=2, help="training steps sampled for the peak")
    parser.add_argument("--mem-budget-gib", type=float, default=18.0, help="skip what would not fit in this")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="ResNet-18, ZeRO-0 and FSDP, one step: that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.archs, args.backends, args.steps = "resnet18", "zero0,fsdp", 1
    for name in args.archs.split(","):
        if name not in ARCHS:
            parser.error(f"unknown arch {name!r}; choices: {', '.join(ARCHS)}")
    for name in args.backends.split(","):
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choices: {', '.join(BACKENDS)}")
    return args


def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeakSampler:
    """The largest resident set seen by a thread polling every 2 ms while the block runs."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the resident set shows what is still held."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _local_param_bytes(model: MoCo, backend: str) -> int:
    total = 0
    for p in model.parameters():
        local = p.ds_tensor if backend == "zero3" else (p.to_local() if hasattr(p, "to_local") else p)
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, port: int, arch: str, backend: str, args: argparse.Namespace, out: str) -> None:
    join_local_gloo(rank, WORLD, port)
    _release_freed_memory()
    base = _rss()
    with PeakSampler() as init:
        torch.manual_seed(0)
        name, width = ARCHS[arch]
        model = MoCo(build_resnet(name, width), MocoConfig(queue_size=4096), world_size=WORLD, cuda_graph_ema=False)

        def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(module, "sgd", lr=0.03)

        if backend == "fsdp":
            engine = FSDPEngine(model, make_optimizer, "fp32")
        else:
            stage = int(backend.removeprefix("zero"))
            engine = DeepSpeedEngine(model, make_optimizer, "fp32", stage, args.batch, WORLD)
        _release_freed_memory()
    g = torch.Generator().manual_seed(rank)
    size = args.image_size
    views = [torch.randn(args.batch, 3, size, size, generator=g) for _ in range(2)]
    started = time.perf_counter()
    with PeakSampler() as train:
        for step in range(args.steps):
            engine.train_step(*views, lr=0.03, momentum=0.999, step=step)
    step_s = (time.perf_counter() - started) / args.steps
    peaks = torch.tensor([init.peak - base, train.peak - base, _local_param_bytes(model, backend)], dtype=torch.float64)
    gathered = [torch.zeros_like(peaks) for _ in range(WORLD)]
    dist.all_gather(gathered, peaks)
    if rank == 0:
        worst = torch.stack(gathered).max(dim=0).values / MIB
        torch.save(
            {"init": worst[0].item(), "train": worst[1].item(), "params": worst[2].item(), "step_s": step_s}, out
        )
    dist.barrier()  # leave together
    shutdown_distributed()


def measure(arch: str, backend: str, args: argparse.Namespace, attempts: int = 2) -> dict[str, float]:
    """One fresh pair of ranks; a pair that dies (seen rarely: a native abort at exit) is run again."""
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.pt"
            try:
                mp.spawn(_rank, args=(free_port(), arch, backend, args, out), nprocs=WORLD, join=True)
                return {**torch.load(out), "attempts": attempt}
            except mp.ProcessExitedException as err:
                print(f"{arch} {backend}: attempt {attempt} failed ({err})", file=sys.stderr, flush=True)
                if attempt == attempts:
                    raise
    raise ValueError("attempts must be >= 1")


def query_params(arch: str) -> int:
    name, width = ARCHS[arch]
    return sum(p.numel() for p in build_resnet(name, width).parameters())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, results = [], []
    for arch in args.archs.split(","):
        params = query_params(arch)
        for backend in args.backends.split(","):
            estimate_gib = 5 * params * 4 * WORLD / 2**30
            if estimate_gib > args.mem_budget_gib:
                print(f"skip {arch} {backend}: ~{estimate_gib:.1f} GiB > --mem-budget-gib", file=sys.stderr)
                rows.append([arch, backend, f"{params / 1e6:.0f}M", "-", "-", "-", "skipped (memory budget)"])
                continue
            print(f"{arch} {backend} ...", file=sys.stderr, flush=True)
            r = measure(arch, backend, args)
            results.append({"arch": arch, "backend": backend, "backbone_params": params, **r})
            rows.append(
                [arch, backend, f"{params / 1e6:.0f}M", r["params"], r["train"], r["init"], f"{r['step_s']:.2f}"]
            )
    headers = ["arch", "backend", "backbone", "params_local_mib", "train_peak_mib", "init_peak_mib", "step_s"]
    print(format_table(headers, rows))
    write_json(
        args.json,
        {
            "env": environment(),
            "args": vars(args),
            "results": results,
            "train_peak_mib_max": max((r["train"] for r in results), default=0.0),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
