"""ResNet-50 MoCo v2 (or, with ``--arch vit_base``, ViT-B/16 MoCo v3) on one GPU: pairs/s with the stage
breakdown, the EMA, and the largest batch that fits.

    bash benchmarks/gpu_suite.sh                      # on the GPU machine (installs the carried wheels)
    python benchmarks/gpu_suite.py --device cpu --tiny --json /tmp/gpu_suite.json   # CPU dry run, same code
    python benchmarks/gpu_suite.py --smoke --json /tmp/gpu_suite.json   # the dry run in CI: 1 round, OOM simulated
    python benchmarks/gpu_suite.py --smoke --arch vit_base --json /tmp/gpu_suite_vit.json   # its ViT (vit_tiny)

A ViT is built as ``configs/mocov3_vit_b.yaml`` says (4096-wide heads, 256 out, T = 0.2, m = 0.99, AdamW lr
1.5e-4 x batch / 256, weight decay 0.1, the patch projection frozen), without a queue. For a ResNet:

One process, one device, synthetic views already on it (no data loader). The model is built as
``moco_scale.train.build_engine`` builds it for ``configs/mocov2_r50.yaml`` on one rank: MoCo
v2 (dim 128, MLP head, K = 65536, T = 0.2, m = 0.999), shuffle-BN as ``SplitBatchNorm`` with 8 groups,
channels_last on CUDA, the momentum update captured in a CUDA graph, SGD from ``build_optimizer``
(lr 0.03 x batch / 256), bf16 autocast. ``moco_scale.train`` itself is not imported: it needs the data
stack (webdataset, fire), which the GPU machine lacks.

Phases (the JSON is rewritten after each, so a time-out keeps what was measured):

0. ``correctness``: ``benchmarks/gpu_checks.py``, each check pass/fail on its own (the EMA's CUDA graph
   bitwise, short bf16 runs that learn, fp32 against the CPU, placement and dtypes, channels-last against
   contiguous, single-process shuffle-BN against the CPU); ``--checks placement`` keeps only the check of
   the suite's own engine (the ViT run in ``gpu_suite.sh``, after the ResNet's run made the rest).
1. ``throughput``: ``benchmarks/throughput.py: measure_methods`` on, interleaved,
   ``engine`` (``DeepSpeedEngine`` ZeRO 0, or when DeepSpeed does not import, ``plain``), on CUDA the same
   with ``torch.backends.cudnn.benchmark`` on, and ``plain`` (``LocalEngine``: the same step on our module
   and optimizer with the same autocast policy, no DeepSpeed); pairs/s from CUDA events with the stage timer
   off, then the breakdown (the timer synchronises at every stage boundary) and ``max_memory_allocated``.
2. ``ema``: ``benchmarks/ema.py: bench_device`` on the model's own encoders: the fused update (CUDA
   graph replay) vs the per-parameter loop vs one multi-tensor copy.
3. ``max_batch``: the largest batch for which one training step of the engine runs: doubling from
   ``--batch`` until a step fails (CUDA out of memory, or any other error, recorded), then bisection to
   ``--batch-granularity``, within ``--budget-s`` of the start.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from moco_scale.config import MocoConfig, ModelConfig
from moco_scale.distributed.comm import init_distributed
from moco_scale.engine.base import COMPUTE_DTYPES
from moco_scale.engine.local import LocalEngine
from moco_scale.moco import MoCo
from moco_scale.models import VIT_SPECS, build_backbone
from moco_scale.optim import build_optimizer, linear_scaled_lr

try:
    from benchmarks._common import environment, format_table, median, write_json
    from benchmarks.ema import bench_device
    from benchmarks.gpu_checks import correctness_phase, device_batch, photo_jpegs
    from benchmarks.throughput import measure_methods, summarise_method
except ModuleNotFoundError:  # run as ``python benchmarks/gpu_suite.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, write_json
    from ema import bench_device
    from gpu_checks import correctness_phase, device_batch, photo_jpegs
    from throughput import measure_methods, summarise_method

GOAL_PAIRS_PER_S = {"resnet50": 7000, "vit_base": 1500}  # issue goals, per H100/H200, compute only
TINY = {"arch": "resnet18", "image_size": 32, "batch": 16, "queue": 1024, "max_batch_limit": 128}
TINY_VIT = {**TINY, "arch": "vit_tiny", "patch_size": 8}


def is_vit(arch: str) -> bool:
    return arch in VIT_SPECS


def moco_settings(args: argparse.Namespace) -> MocoConfig:
    """ResNets: MoCo v2 as configs/mocov2_r50.yaml. ViTs: MoCo v3 as configs/mocov3_vit_b.yaml (4096-wide heads,
    256 out, T = 0.2, m = 0.99; on one device the heads' SyncBN is plain BN); a --tiny ViT has 256-wide heads."""
    if is_vit(args.arch):
        return MocoConfig("v3", dim=256, mlp_dim=256 if args.tiny else 4096, momentum=0.99, shuffle_bn="none")
    return MocoConfig(queue_size=args.queue)


def optimizer_for(module: torch.nn.Module, args: argparse.Namespace, lr: float, device: torch.device):
    """SGD (MoCo v2) or, for a ViT, AdamW with weight decay 0.1 (MoCo v3's), from ``build_optimizer``."""
    if is_vit(args.arch):
        return build_optimizer(module, "adamw", lr, weight_decay=0.1, device_type=device.type)
    return build_optimizer(module, "sgd", lr, 0.9, 1e-4, device_type=device.type)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--arch", default="resnet50", help="a ResNet (MoCo v2) or a ViT (MoCo v3), e.g. vit_base")
    parser.add_argument("--patch-size", type=int, default=16, help="ViTs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=65536, help="K")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 (fp32 for a CPU --tiny)")
    parser.add_argument(
        "--checks", choices=["all", "placement", "none"], default="all", help="the correctness phase's checks"
    )
    parser.add_argument(
        "--loader-batches", type=int, default=10, help="timed batches of the torch loader's device path (0: skip)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per method first")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps with the stage timer on")
    parser.add_argument("--ema-steps", type=int, default=50, help="EMA calls per method per round")
    parser.add_argument("--max-batch-limit", type=int, default=16384, help="largest batch tried")
    parser.add_argument("--batch-granularity", type=int, default=64, help="bisection stops at this step")
    parser.add_argument("--budget-s", type=float, default=400, help="phases that would start later are skipped")
    parser.add_argument("--no-deepspeed", action="store_true", help="time only the step without DeepSpeed")
    parser.add_argument("--simulate-oom-above", type=int, default=0, help="dry runs: batches above this 'OOM'")
    parser.add_argument("--tiny", action="store_true", help="resnet18, 32 px, batch 16, few steps: a dry run")
    parser.add_argument("--smoke", action="store_true", help="--tiny on the CPU, 1 round, OOM simulated above 24: CI")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.device = True, "cpu"
    if args.tiny:
        tiny = TINY_VIT if is_vit(args.arch) else TINY
        args.arch, args.image_size, args.batch = tiny["arch"], tiny["image_size"], tiny["batch"]
        args.queue, args.max_batch_limit = tiny["queue"], tiny["max_batch_limit"]
        args.patch_size = tiny.get("patch_size", args.patch_size)
        args.steps, args.warmup, args.rounds, args.profile_steps, args.ema_steps = 2, 1, 2, 2, 3
        args.batch_granularity = 16
        if args.smoke:
            args.batch_granularity, args.simulate_oom_above = 8, 24
            args.steps, args.rounds, args.profile_steps = 1, 1, 1
    if args.precision is None:  # bf16 autocast on a CPU without bf16 units is ~20x slower than fp32
        args.precision = "fp32" if args.tiny and args.device == "cpu" else "bf16"
    return args


def build(args: argparse.Namespace, device: torch.device, world_size: int) -> tuple[MoCo, dict[str, Any], float]:
    """The model on ``device`` and its engines: ``engine`` (DeepSpeed if it imports) and ``plain``."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(args.arch, patch_size=args.patch_size), args.image_size)
    model = MoCo(backbone, moco_settings(args), world_size=world_size)
    channels_last = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    lr = linear_scaled_lr(1.5e-4 if is_vit(args.arch) else 0.03, args.batch)  # the recipes' base lr per 256
    engines: dict[str, Any] = {}
    notes: list[str] = []
    if not args.no_deepspeed and world_size:
        try:
            from moco_scale.engine.deepspeed import DeepSpeedEngine

            def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
                return optimizer_for(module, args, lr, device)

            engines["engine"] = DeepSpeedEngine(model, make_optimizer, args.precision, 0, args.batch, world_size)
        except Exception as exc:  # DeepSpeed missing or broken here: say so and go on without it
            notes.append(f"DeepSpeed unavailable ({type(exc).__name__}: {exc}); timing the step without it")
            traceback.print_exc()
    plain_optimizer = optimizer_for(model, args, lr, device)
    engines["plain"] = LocalEngine(model, plain_optimizer, args.precision)
    if "engine" not in engines:
        engines["engine"] = engines["plain"]
    engines["notes"] = notes
    return model, engines, lr


def synthetic_views(batch: int, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    shape = (batch, 3, args.image_size, args.image_size)
    return [torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2)]


def throughput_phase(
    args: argparse.Namespace, engines: dict[str, Any], lr: float, device: torch.device
) -> dict[str, Any]:
    views = synthetic_views(args.batch, args, device)
    counter = {"step": 0}

    def stepper(engine: Any, cudnn_benchmark: bool) -> Callable[[], object]:
        def step() -> object:
            torch.backends.cudnn.benchmark = cudnn_benchmark
            counter["step"] += 1
            return engine.train_step(*views, lr=lr, momentum=0.999, step=counter["step"])

        return step

    methods = {"engine": stepper(engines["engine"], False)}
    if device.type == "cuda":
        methods["engine_cudnn_benchmark"] = stepper(engines["engine"], True)
    if engines["plain"] is not engines["engine"]:
        methods["plain"] = stepper(engines["plain"], False)
    results = measure_methods(methods, args.steps, args.warmup, args.rounds, args.profile_steps, device)
    torch.backends.cudnn.benchmark = False
    per_rank = [{"methods": results}]
    return {name: summarise_method(name, per_rank, args.batch) for name in methods}


def loader_phase(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The torch loader's device path for GPUs without DALI (``DeviceViews``): a batch of 400x300 JPEG photos
    decoded on the device in one call, both MoCo v2 views cropped and augmented there; pairs/s, median of
    ``--loader-batches`` after 2 warm-up batches (the workers' reading and drawing not included)."""
    from moco_scale.data.augment import moco_views
    from moco_scale.data.device_views import DeviceViews

    views = moco_views("v2", args.image_size)
    batch = device_batch(photo_jpegs(args.batch), views)
    finish = DeviceViews(views, device, COMPUTE_DTYPES[args.precision])
    seconds = []
    for i in range(2 + args.loader_batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        finish(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            seconds.append(time.perf_counter() - t0)
    per_batch = median(seconds)
    return {"pairs_per_s": args.batch / per_batch, "ms_per_batch": 1e3 * per_batch, "batches": len(seconds)}


def ema_phase(args: argparse.Namespace, model: MoCo, device: torch.device) -> dict[str, Any]:
    options = SimpleNamespace(steps=args.ema_steps, warmup=3, repeats=args.rounds)
    result = bench_device(model.encoder_q, model.encoder_k, device, options)
    result["params"] = sum(p.numel() for p in model.encoder_q.parameters())
    result["tensors"] = len(list(model.encoder_q.parameters()))
    return result


def fits(engine: Any, batch: int, args: argparse.Namespace, lr: float, device: torch.device) -> tuple[bool, str]:
    """Whether one training step at ``batch`` runs; the error's first line if not."""
    views: list[torch.Tensor] = []
    try:
        if args.simulate_oom_above and batch > args.simulate_oom_above:
            raise torch.cuda.OutOfMemoryError(f"simulated: batch {batch} > {args.simulate_oom_above}")
        views = synthetic_views(batch, args, device)
        out = engine.train_step(*views, lr=lr, momentum=0.999, step=batch)
        if not torch.isfinite(out.loss):
            return False, f"loss {out.loss.item()}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True, ""
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        del views
        engine_model = getattr(engine, "model", None)
        if engine_model is not None:
            engine_model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_batch_phase(
    args: argparse.Namespace, engine: Any, lr: float, device: torch.device, deadline: float
) -> dict[str, Any]:
    granularity = args.batch_granularity
    # a global batch larger than K is a config error (v1/v2); v3 has no queue
    limit = args.max_batch_limit if is_vit(args.arch) else min(args.max_batch_limit, args.queue)
    trials: list[dict[str, Any]] = []

    def trial(batch: int) -> bool:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        ok, error = fits(engine, batch, args, lr, device)
        record = {"batch": batch, "fits": ok, "seconds": time.perf_counter() - start, "error": error}
        if device.type == "cuda" and ok:
            record["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        trials.append(record)
        print(f"  batch {batch}: {'fits' if ok else 'does not fit: ' + error}", flush=True)
        return ok

    good, bad = 0, None
    batch = args.batch
    while batch <= limit and time.monotonic() < deadline:
        if not trial(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and good and bad - good > granularity and time.monotonic() < deadline:
        middle = (good + bad) // 2 // granularity * granularity
        if middle <= good:
            break
        if trial(middle):
            good = middle
        else:
            bad = middle
    return {
        "largest_batch_that_fits": good or None,
        "smallest_batch_that_failed": bad,
        "limit": limit,
        "granularity": granularity,
        "complete": (bad is None and batch > limit) or (bad is not None and bad - good <= granularity),
        "trials": trials,
    }


def checks_phase(args: argparse.Namespace, engine: Any, device: torch.device) -> dict[str, Any]:
    if args.checks == "none":
        return {}
    views = synthetic_views(args.batch, args, device)
    return correctness_phase(engine, args.precision, device, views, general=args.checks == "all")


def print_summary(payload: dict[str, Any]) -> None:
    rows: list[list[object]] = [
        [f"check {name}", f"{check['status'].upper()}: {check['detail']}"]
        for name, check in payload.get("correctness", {}).items()
    ]
    goal = GOAL_PAIRS_PER_S.get(payload["args"]["arch"])
    tp = payload.get("throughput", {})
    for name, s in tp.items():
        rows.append([f"pairs/s, {name}", s["pairs_per_s"]])
    if "engine" in tp:
        s = tp["engine"]
        rows.append(
            ["ms/step, engine (timer off / profiled)", f"{s['ms_per_step']:.2f} / {s['profiled_ms_per_step']:.2f}"]
        )
        rows += [
            [f"  {stage} ms (%)", f"{ms:.2f} ({s['breakdown_pct'][stage]:.1f}%)"]
            for stage, ms in s["breakdown_ms"].items()
        ]
        rows.append(["peak memory MB, engine", s["peak_memory_mb_by_rank"][0]])
        if goal is not None:
            rows.append([f"goal >= {goal} pairs/s", "met" if s["pairs_per_s"] >= goal else "not met"])
    ema = payload.get("ema")
    if ema:
        rows += [[f"EMA ms, {name}", ms] for name, ms in ema["ms"].items()]
    loader = payload.get("loader", {})
    if "pairs_per_s" in loader:
        rows.append(["pairs/s, torch loader device path (decode + views)", loader["pairs_per_s"]])
    mb = payload.get("max_batch")
    if mb:
        rows.append(["largest batch that fits", mb["largest_batch_that_fits"] or "-"])
        rows.append(["smallest batch that failed", mb["smallest_batch_that_failed"] or "-"])
    print()
    print(payload["title"])
    print(format_table(["what", "value"], rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu --tiny for a dry run)", file=sys.stderr)
        sys.exit(2)
    payload: dict[str, Any] = {"benchmark": "gpu_suite", "args": vars(args), **environment()}
    notes: list[str] = []
    try:
        ctx = init_distributed(args.device)
        device, world_size = ctx.device, ctx.world_size
    except Exception as exc:  # no process group: DeepSpeed cannot run, our module still can
        device, world_size = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"), 0
        notes.append(f"no process group ({type(exc).__name__}: {exc})")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # a dry run; on a shared CPU a second thread can stall every op
    model, engines, lr = build(args, device, world_size)
    uses_deepspeed = engines["engine"] is not engines["plain"]
    payload["notes"] = notes + engines.pop("notes")
    payload.update(
        device=str(device),
        engine="DeepSpeedEngine (ZeRO 0)" if uses_deepspeed else "plain (no DeepSpeed)",
        lr=lr,
        params_query=sum(p.numel() for p in model.encoder_q.parameters()),
    )
    layout = "channels_last" if device.type == "cuda" else "NCHW"
    recipe = "MoCo v3" if is_vit(args.arch) else f"MoCo v2, K = {args.queue}"
    payload["title"] = (
        f"gpu_suite: {args.arch} {recipe}, {args.image_size} px, batch {args.batch}, "
        f"{args.precision}, {layout}, synthetic views on {device}; engine: {payload['engine']}"
    )
    print(payload["title"], flush=True)
    for note in payload["notes"]:
        print(f"note: {note}", flush=True)
    phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("correctness", lambda: checks_phase(args, engines["engine"], device)),
        ("throughput", lambda: throughput_phase(args, engines, lr, device)),
        ("ema", lambda: ema_phase(args, model, device)),
        ("loader", lambda: loader_phase(args, device) if args.loader_batches else {"skipped": "--loader-batches 0"}),
        ("max_batch", lambda: max_batch_phase(args, engines["engine"], lr, device, deadline)),
    ]
    for name, phase in phases:
        if time.monotonic() > deadline:
            payload.setdefault("skipped", []).append(name)
            print(f"{name}: skipped, past --budget-s", flush=True)
            continue
        t0 = time.monotonic()
        print(f"{name} ...", flush=True)
        try:
            payload[name] = phase()
        except Exception as exc:  # one phase failing must not lose the others
            traceback.print_exc()
            payload.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
        payload.setdefault("phase_seconds", {})[name] = time.monotonic() - t0
        write_json(args.json, payload)
    checks = payload.get("correctness", {})
    payload["checks_failed"] = sorted(name for name, check in checks.items() if check["status"] == "fail")
    if "throughput" in payload and "engine" in payload["throughput"]:
        payload["pairs_per_s_compute"] = payload["throughput"]["engine"]["pairs_per_s"]
        goal = GOAL_PAIRS_PER_S.get(args.arch)
        payload["goal_met"] = None if goal is None else payload["pairs_per_s_compute"] >= goal
    payload["wall_s"] = time.monotonic() - start
    write_json(args.json, payload)
    print_summary(payload)
    return payload


if __name__ == "__main__":
    main()
