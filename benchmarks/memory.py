"""Per-rank memory of MoCo training under each backend: ResNet-50 x1/x2/x4 (MoCo v2) and ViT-B/L/H (MoCo v3),
DeepSpeed ZeRO-0/2/3 and FSDP2, with and without activation checkpointing and sharded construction.

    python benchmarks/memory.py [--archs resnet50x1,resnet50x2,resnet50x4] [--backends zero0,zero2,zero3,fsdp]
                                [--checkpointing off,on] [--builds sharded,whole] [--image-size 32] [--batch 2]
                                [--fit-gib 80] [--json PATH] [--smoke]

Every row is the launcher's own model and engine (``moco_scale.train.build_engine``) for the arch's recipe,
``configs/mocov2_r50.yaml`` or ``configs/mocov3_vit_b.yaml``, in fp32, each in a fresh pair of gloo ranks on
the CPU (one torch thread each), at a small input unless ``--image-size`` says otherwise: the figures are then
the model state's (parameters of both encoders, gradients, optimizer state, the backend's own buffers), with
small activations.

Per rank (the larger of the two) it reports
- ``params_local_mib``: the bytes of the parameters this rank holds (both encoders, local shards);
- ``train_peak_mib``: the peak resident set while training (sampled every 2 ms over the steps, which include
  the first optimizer step that allocates its state) above the resident set of the bare process;
- ``live_peak_mib``: the peak, sampled alongside, of the bytes malloc has handed out and not yet taken back
  (glibc's ``mallinfo2``: ``uordblks + hblkhd``) above the bare process's: the tensors and other heap objects
  alive, without the freed memory the allocator keeps resident. glibc keeps much of what a sharding backend
  frees (all-gather buffers) when its mmap threshold has grown, so the resident set can exceed this by a
  GiB per rank; ``-`` where the C library has no ``mallinfo2``;
- ``init_peak_mib``: the resident-set peak up to the end of the engine's set-up. ``--builds whole`` builds the
  whole model on every rank before the backend shards it (``engine.sharded_build=false``); ``sharded`` (the
  default under FSDP2 and ZeRO-3) builds on the meta device or under ``zero.Init``. ZeRO-0/2 always build whole.

For each (backend, checkpointing, build) it fits ``peak = a + b x backbone parameters`` over the archs of a
family it measured and reports the largest backbone whose training peak fits ``--fit-gib`` per rank at this
input size and batch. A row whose estimate (``ESTIMATE_BYTES_PER_PARAM``) would overrun ``--mem-budget-gib``
for both ranks together is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.config import Config, load_config
from moco_scale.distributed.comm import DistInfo, free_port, join_local_gloo, shutdown_distributed
from moco_scale.moco import MoCo
from moco_scale.models import build_backbone
from moco_scale.train import build_engine

try:
    from benchmarks._common import environment, format_table, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/memory.py``: the script's folder is on sys.path
    from _common import environment, format_table, write_json

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
MIB = 2**20
# name -> (recipe, model overrides)
ARCHS: dict[str, tuple[str, dict[str, object]]] = {
    "resnet18": ("mocov2_r50.yaml", {"model.arch": "resnet18"}),
    "resnet50x1": ("mocov2_r50.yaml", {"model.arch": "resnet50", "model.width": 1}),
    "resnet50x2": ("mocov2_r50.yaml", {"model.arch": "resnet50", "model.width": 2}),
    "resnet50x4": ("mocov2_r50.yaml", {"model.arch": "resnet50", "model.width": 4}),
    "vit_tiny": ("mocov3_vit_b.yaml", {"model.arch": "vit_tiny"}),
    "vit_small": ("mocov3_vit_b.yaml", {"model.arch": "vit_small"}),
    "vit_base": ("mocov3_vit_b.yaml", {"model.arch": "vit_base"}),
    "vit_large": ("mocov3_vit_b.yaml", {"model.arch": "vit_large"}),
    "vit_huge": ("mocov3_vit_b.yaml", {"model.arch": "vit_huge", "model.patch_size": 14}),
}
BACKENDS = {"zero0": ("deepspeed", 0), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3), "fsdp": ("fsdp", 0)}
# The train peak per rank per backbone parameter, 2 ranks, fp32, as measured (RESULTS.md): MoCo v2 ResNets with
# SGD up to 20 bytes, MoCo v3 ViTs with AdamW and 4096-wide heads up to 34, ZeRO-3 a quarter more.
ESTIMATE_BYTES_PER_PARAM = {"sgd": 20.0, "adamw": 34.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--archs", default="resnet50x1,resnet50x2,resnet50x4", help=f"comma-separated: {list(ARCHS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated: {list(BACKENDS)}")
    parser.add_argument(
        "--checkpointing", default="off", help="comma-separated: off,on (model.activation_checkpointing)"
    )
    parser.add_argument("--builds", default="sharded", help="comma-separated: sharded,whole (engine.sharded_build)")
    parser.add_argument("--image-size", type=int, default=32, help="ViTs: a multiple of the patch (14 for vit_huge)")
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--steps", type=int, default=2, help="training steps sampled for the peak")
    parser.add_argument("--mem-budget-gib", type=float, default=18.0, help="skip what would not fit in this")
    parser.add_argument("--fit-gib", type=float, default=80.0, help="per-rank memory for the largest-model column")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument(
        "--smoke", action="store_true", help="vit_tiny: ZeRO-0, FSDP2 built sharded and whole; one step"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.archs, args.backends, args.steps, args.builds = "vit_tiny", "zero0,fsdp", 1, "sharded,whole"
    choices = {"archs": ARCHS, "backends": BACKENDS, "checkpointing": ("off", "on"), "builds": ("sharded", "whole")}
    for option, allowed in choices.items():
        for name in getattr(args, option).split(","):
            if name not in allowed:
                parser.error(f"--{option}: unknown {name!r}; choices: {', '.join(allowed)}")
    return args


def row_config(arch: str, backend: str, checkpointing: str, build: str, args: argparse.Namespace) -> Config:
    """The arch's recipe, on this backend, fp32, at the benchmark's input size and batch."""
    recipe, model = ARCHS[arch]
    engine, stage = BACKENDS[backend]
    size = args.image_size
    if arch.startswith("vit"):  # the nearest multiple of the patch, so one size serves ViT-B/16 and ViT-H/14
        patch = int(model.get("model.patch_size", 16))
        size = max(patch, round(size / patch) * patch)
    overrides = {
        **model,
        "model.activation_checkpointing": checkpointing == "on",
        "engine.backend": engine,
        "engine.zero_stage": stage,
        "engine.sharded_build": build == "sharded",
        "engine.precision": "fp32",
        "engine.cuda_graph_ema": False,
        "data.image_size": size,
        "train.batch_size": args.batch,
    }
    return load_config(ROOT / "configs" / recipe, overrides)


def _rss() -> int:
    return psutil.Process().memory_info().rss


_MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later)."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


_MALLINFO2 = _load_mallinfo2()


def _malloc_in_use() -> int:
    """The bytes malloc has handed out and not taken back, in all arenas and in mmapped chunks (0 without
    ``mallinfo2``)."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class PeakSampler:
    """The largest resident set, and the largest malloc'd bytes in use, seen by a thread polling every 2 ms
    while the block runs."""

    def __init__(self) -> None:
        self.peak = _rss()
        self.live_peak = _malloc_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())
            self.live_peak = max(self.live_peak, _malloc_in_use())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.live_peak = max(self.live_peak, _malloc_in_use())


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the resident set shows what is still held."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _local_param_bytes(model: MoCo) -> int:
    total = 0
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, port: int, cfg: Config, steps: int, out: str) -> None:
    join_local_gloo(rank, WORLD, port)
    ctx = DistInfo(rank, WORLD, rank, WORLD, torch.device("cpu"))
    _release_freed_memory()
    base, live_base = _rss(), _malloc_in_use()
    with PeakSampler() as init:
        model, engine = build_engine(cfg, ctx, peak_lr=1e-4)
        _release_freed_memory()
    g = torch.Generator().manual_seed(rank)
    size, batch = cfg.data.image_size, cfg.train.batch_size
    views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
    started = time.perf_counter()
    with PeakSampler() as train:
        for step in range(steps):
            engine.train_step(*views, lr=1e-4, momentum=0.99, step=step)
    step_s = (time.perf_counter() - started) / steps
    live = train.live_peak - live_base if _MALLINFO2 is not None else float("nan")
    peaks = torch.tensor([init.peak - base, train.peak - base, _local_param_bytes(model), live], dtype=torch.float64)
    gathered = [torch.zeros_like(peaks) for _ in range(WORLD)]
    dist.all_gather(gathered, peaks)
    if rank == 0:
        worst = torch.stack(gathered).max(dim=0).values / MIB
        figures = {"init": worst[0].item(), "train": worst[1].item(), "params": worst[2].item()}
        live_peak = None if math.isnan(worst[3].item()) else worst[3].item()
        torch.save({**figures, "live": live_peak, "step_s": step_s}, out)
    dist.barrier()  # leave together
    shutdown_distributed()


def measure(cfg: Config, steps: int, attempts: int = 2) -> dict[str, float] | str:
    """One fresh pair of ranks; a pair that dies with an error (seen rarely: a native abort at exit) is run
    again. A rank the kernel killed (out of memory) ends the row: its reason is returned instead."""
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.pt"
            try:
                mp.spawn(_rank, args=(free_port(), cfg, steps, out), nprocs=WORLD, join=True)
                return {**torch.load(out), "attempts": attempt}
            except mp.ProcessExitedException as err:
                print(f"attempt {attempt} failed ({err})", file=sys.stderr, flush=True)
                if err.signal_name == "SIGKILL":
                    return "killed (out of memory)"
                if attempt == attempts:
                    raise
    raise ValueError("attempts must be >= 1")


def query_params(cfg: Config) -> int:
    """The query backbone's parameter count, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_backbone(cfg.model, cfg.data.image_size).parameters())


def largest_fit(results: list[dict], fit_gib: float) -> list[dict]:
    """Per (family, backend, checkpointing, build) measured at two archs or more: the least-squares line
    ``peak = a + b x backbone params`` and the backbone size whose peak reaches ``fit_gib`` on it. The peak is
    the live one where every row has it (what the model needs; a GPU's caching allocator keeps its own, smaller
    slack), else the resident set's; ``peak`` names which."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        family = "vit" if r["arch"].startswith("vit") else "resnet"
        groups.setdefault((family, r["backend"], r["checkpointing"], r["build"]), []).append(r)
    fits = []
    for (family, backend, checkpointing, build), rows in groups.items():
        if len({r["backbone_params"] for r in rows}) < 2:
            continue
        peak = "live" if all(r["live"] is not None for r in rows) else "train"
        slope, intercept = statistics.linear_regression([r["backbone_params"] for r in rows], [r[peak] for r in rows])
        if slope <= 0:
            continue
        params = (fit_gib * 1024 - intercept) / slope
        fits.append(
            {
                "family": family,
                "backend": backend,
                "checkpointing": checkpointing,
                "build": build,
                "peak": peak,
                "mib_per_million_params": slope * 1e6,
                "fixed_mib": intercept,
                "largest_backbone_params": params,
            }
        )
    return fits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, results = [], []
    seen = set()
    grid = [args.archs, args.backends, args.checkpointing, args.builds]
    for arch, backend, checkpointing, asked in itertools.product(*(option.split(",") for option in grid)):
        build = asked if backend in ("zero3", "fsdp") else "whole"  # ZeRO-0/2 always build whole
        if (arch, backend, checkpointing, build) in seen:
            continue
        seen.add((arch, backend, checkpointing, build))
        cfg = row_config(arch, backend, checkpointing, build, args)
        params = query_params(cfg)
        label = [arch, f"{params / 1e6:.0f}M", backend, checkpointing, build]
        per_param = ESTIMATE_BYTES_PER_PARAM[cfg.optim.name] * (1.25 if backend == "zero3" else 1.0)
        estimate_gib = per_param * params * WORLD / 2**30
        if estimate_gib > args.mem_budget_gib:
            print(f"skip {' '.join(label)}: ~{estimate_gib:.1f} GiB > --mem-budget-gib", file=sys.stderr)
            rows.append([*label, "-", "-", "-", "-", "skipped (memory budget)"])
            continue
        print(f"{' '.join(label)} ...", file=sys.stderr, flush=True)
        r = measure(cfg, args.steps)
        if isinstance(r, str):
            rows.append([*label, "-", "-", "-", "-", r])
            continue
        results.append(
            {
                "arch": arch,
                "backend": backend,
                "checkpointing": checkpointing,
                "build": build,
                "image_size": cfg.data.image_size,
                "backbone_params": params,
                **r,
            }
        )
        live = "-" if r["live"] is None else r["live"]
        rows.append([*label, r["params"], r["train"], live, r["init"], f"{r['step_s']:.2f}"])
        live_text = "" if r["live"] is None else f", live peak {r['live']:.0f} MiB"
        print(
            f"{' '.join(label)}: train peak {r['train']:.0f} MiB{live_text}, init peak {r['init']:.0f} MiB", flush=True
        )
        if args.json:  # what has finished so far, should a later row take the process down
            write_json(args.json + ".partial", {"args": vars(args), "results": results})
    labels = ["arch", "backbone", "backend", "ckpt", "build"]
    figures = ["params_local_mib", "train_peak_mib", "live_peak_mib", "init_peak_mib", "step_s"]
    print(format_table([*labels, *figures], rows))
    fits = largest_fit(results, args.fit_gib)
    if fits:
        keys = ("family", "backend", "checkpointing", "build", "peak", "mib_per_million_params", "fixed_mib")
        fit_rows = [[*(f[k] for k in keys), f"{f['largest_backbone_params'] / 1e9:.2f}B"] for f in fits]
        print(format_table([*keys, f"largest backbone in {args.fit_gib:g} GiB"], fit_rows))
    write_json(
        args.json,
        {
            "env": environment(),
            "args": vars(args),
            "results": results,
            "largest_fit": fits,
            "train_peak_mib_max": max((r["train"] for r in results), default=0.0),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
