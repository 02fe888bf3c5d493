"""Training throughput (pairs/s) of the real engine, end to end and compute-only, with a per-stage breakdown.

    python benchmarks/throughput.py [--config configs/demo.yaml] [--section.field=value ...]
        [--world-size N] [--modes compute,e2e] [--steps 10] [--warmup 3] [--rounds 3]
        [--profile-steps N] [--compare-reference] [--json PATH] [--smoke]

``--world-size`` ranks are spawned on this machine (gloo on the CPU, NCCL with one GPU per rank),
each joining the group through ``moco_scale.distributed.comm.init_distributed`` as under the launcher (on
the CPU the cores are split between the ranks), and each building the model, optimizer and
``DeepSpeedEngine`` with ``moco_scale.train.build_engine`` from the config and its overrides.
Every step is ``engine.train_step`` at the peak learning rate and the config's key momentum.

- ``compute``: synthetic views, drawn once per rank and already on the device;
- ``e2e``: the real loader (``two_view_batches``: the config's data, backend, workers), with the
  host-to-device copy, as the launcher's loop does it;
- ``reference`` (``--compare-reference``): fb/moco's step (``benchmarks/reference_moco.py``) on the
  same synthetic views, model, batch and threads. ``ratio_vs_reference`` = our compute-only pairs/s /
  the reference's, taken in each round (the two ran back to back) and the median over rounds
  reported. Needs MoCo v1/v2, shuffle-BN, SGD and fp32. It also times one ``all_reduce`` of a
  tensor as large as the gradient, alone (``gradient_allreduce_alone_ms``), to set the ``comm``
  stage against what the wire costs.

Every method first runs ``--warmup`` steps; then ``--rounds`` rounds in which each method in turn
runs ``--steps`` timed steps (with the stage timer off), after a barrier, so drift of the machine
falls on all alike. A round's time is the slowest rank's mean ms per step; the median over rounds is
reported, and pairs/s = global batch / that. Then each method runs ``--profile-steps`` steps with
``moco_scale.observe.profiling.StageTimer`` on: the breakdown (rank 0's mean ms per step and share per
stage; every rank's in the JSON). Peak memory per rank: on CUDA ``torch.cuda.max_memory_allocated``
over each method's profiled steps; on the CPU the process's peak resident set (``ru_maxrss``) at the
end, which covers every method the rank ran.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_scale.config import Config, ConfigError, load_config, parse_cli_overrides, validate
from moco_scale.data.loader import resolve_backend
from moco_scale.distributed.comm import free_port, init_distributed, set_local_rank_env, shutdown_distributed
from moco_scale.observe import profiling
from moco_scale.optim import linear_scaled_lr
from moco_scale.train import build_batches, build_engine, resolve_inputs, uses_channels_last

try:
    from benchmarks._common import environment, format_table, median, spread, time_interleaved, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/throughput.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, time_interleaved, write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
SMOKE_OVERRIDES = {
    "model.arch": "resnet18",
    "data.image_size": "32",
    "train.batch_size": "8",
    "moco.queue_size": "256",
    "data.workers": "1",
}
MODES = ("compute", "e2e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], epilog="Any other flag is a config override: --section.field=value."
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: the demo's)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks spawned on this machine")
    parser.add_argument("--modes", default="compute,e2e", help="comma-separated: compute, e2e")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--profile-steps", type=int, default=None, help="steps with the stage timer (default --steps)")
    parser.add_argument("--compare-reference", action="store_true", help="also time fb/moco's step (compute-only)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="2 ranks, resnet18 at 32 px, 2 steps, vs reference; CI")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    for flag in rest:
        name, sep, value = flag.partition("=")
        if not (flag.startswith("--") and sep and "." in name):
            parser.error(f"unrecognised argument {flag!r}; config overrides are --section.field=value")
        overrides[name[2:]] = value
    if args.smoke:
        overrides = {**SMOKE_OVERRIDES, **overrides}
        args.world_size, args.steps, args.warmup, args.rounds = 2, 2, 1, 1
        args.compare_reference = True
    args.overrides = parse_cli_overrides(overrides)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.mode_list) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; choices: {', '.join(MODES)}")
    if args.profile_steps is None:
        args.profile_steps = args.steps
    return args


def check_comparable(cfg: Config, world_size: int) -> None:
    """fb/moco's step exists only for what it implements; anything else would not be the same run."""
    global_batch = cfg.train.batch_size * world_size
    problems = {
        "moco.version must be v1 or v2": cfg.moco.version in ("v1", "v2"),
        "moco.shuffle_bn must be shuffle": cfg.moco.shuffle_bn == "shuffle",
        "moco.key_bn_buffers must be own": cfg.moco.key_bn_buffers == "own",
        "moco.mlp_dim must be 0 (fb/moco's MLP is as wide as the backbone)": cfg.moco.mlp_dim == 0,
        "optim.name must be sgd": cfg.optim.name == "sgd",
        "engine.precision must be fp32 (or auto on the CPU)": cfg.engine.precision in ("fp32", "auto"),
        "model.width must be 1 and model.small_stem false": cfg.model.width == 1 and not cfg.model.small_stem,
        "moco.queue_size must be a multiple of the global batch": cfg.moco.queue_size % global_batch == 0,
    }
    failed = [text for text, ok in problems.items() if not ok]
    if failed:
        raise ConfigError("--compare-reference: " + "; ".join(failed))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_methods(
    methods: dict[str, Callable[[], object]],
    steps: int,
    warmup: int,
    rounds: int,
    profile_steps: int,
    device: torch.device,
    barrier: Callable[[], object] | None = None,
) -> dict[str, dict[str, Any]]:
    """Interleaved timing of each method (one training step per call), then one profiled block each.

    Returns per method: ``ms_rounds`` (mean ms per step in each round, timer off), ``steps``
    (the profiled steps' stage records), ``peak_memory_mb`` (CUDA: over the profiled block).
    """
    samples = time_interleaved(methods, steps, warmup, rounds, device, before_repeat=barrier)
    results: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        if barrier is not None:
            barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timer = profiling.StageTimer(device)
        with timer:
            for _ in range(profile_steps):
                with timer.step():
                    fn()
        results[name] = {"ms_rounds": samples[name], "steps": timer.steps}
        if device.type == "cuda":
            results[name]["peak_memory_mb"] = peak_memory_mb(device)
    if device.type != "cuda":
        for result in results.values():
            result["peak_memory_mb"] = peak_memory_mb(device)
    return results


@dataclass
class RankSetup:
    methods: dict[str, Callable[[], object]]  # one training step per call: compute, e2e, reference
    probes: dict[str, Callable[[], object]]  # timed alone: with the reference, one all-reduce of the gradient
    device: torch.device
    data_backend: str | None  # what data.backend resolved to (e2e only)


def rank_methods(args: argparse.Namespace, cfg: Config, rank: int, world: int) -> RankSetup:
    """Everything this rank times, built the launcher's way."""
    ctx = init_distributed(cfg.engine.device)
    peak_lr = linear_scaled_lr(cfg.optim.base_lr, cfg.train.batch_size * world)
    momentum = cfg.moco.momentum
    _, engine = build_engine(cfg, ctx, peak_lr)
    engine.model.train()
    channels_last = uses_channels_last(cfg, ctx)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 1)
    shape = (cfg.train.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    views = [torch.randn(shape, generator=generator).to(ctx.device, memory_format=memory_format) for _ in range(2)]
    counters = dict.fromkeys(MODES, 0)

    def our_step(view1: torch.Tensor, view2: torch.Tensor, counter: str) -> None:
        step = counters[counter]
        counters[counter] += 1
        engine.train_step(view1, view2, lr=peak_lr, momentum=momentum, step=step)

    methods: dict[str, Callable[[], object]] = {}
    data_backend = None
    if "compute" in args.mode_list:
        methods["compute"] = lambda: our_step(*views, "compute")
    if "e2e" in args.mode_list:
        shards = resolve_inputs(cfg)[0]
        data_backend = resolve_backend(cfg.data.backend, shards)
        batches = build_batches(cfg, ctx, shards)

        def e2e_step() -> None:
            with profiling.stage("data_wait"):
                view1, view2, _ = next(batches)
                view1 = view1.to(ctx.device, non_blocking=True, memory_format=memory_format)
                view2 = view2.to(ctx.device, non_blocking=True, memory_format=memory_format)
            our_step(view1, view2, "e2e")

        methods["e2e"] = e2e_step
    probes: dict[str, Callable[[], object]] = {}
    if args.compare_reference:
        methods["reference"] = reference_step(cfg, views, peak_lr)
        gradient = torch.zeros(sum(p.numel() for p in engine.model.parameters() if p.requires_grad), device=ctx.device)
        probes["gradient_allreduce_alone"] = lambda: dist.all_reduce(gradient)
    return RankSetup(methods, probes, ctx.device, data_backend)


def reference_step(cfg: Config, views: list[torch.Tensor], lr: float) -> Callable[[], object]:
    try:
        from benchmarks.reference_moco import ReferenceMoCo, ReferenceTrainer
    except ModuleNotFoundError:
        from reference_moco import ReferenceMoCo, ReferenceTrainer

    torch.manual_seed(cfg.train.seed)
    model = ReferenceMoCo(
        cfg.model.arch,
        cfg.moco.dim,
        mlp=cfg.moco.version == "v2",
        queue_size=cfg.moco.queue_size,
        momentum=cfg.moco.momentum,
        temperature=cfg.moco.temperature,
    ).to(views[0].device)
    trainer = ReferenceTrainer(model.train(), lr, cfg.optim.momentum, cfg.optim.weight_decay)
    return lambda: trainer.train_step(*views)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    set_local_rank_env(rank, world, port)
    cfg = load_config(args.config, args.overrides)
    try:
        setup = rank_methods(args, cfg, rank, world)
        device = setup.device
        results = measure_methods(
            setup.methods, args.steps, args.warmup, args.rounds, args.profile_steps, device, barrier=dist.barrier
        )
        probe_ms = time_interleaved(setup.probes, args.steps, 1, args.rounds, device, before_repeat=dist.barrier)
        result = {
            "rank": rank,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "precision": cfg.engine.resolved_precision(device.type),
            "data_backend": setup.data_backend,
            "methods": results,
            "probes_ms": probe_ms,
        }
        everyone: list[dict | None] = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(out_path).write_text(json.dumps(everyone))
    finally:
        if dist.is_initialized():
            shutdown_distributed()


def summarise_method(name: str, per_rank: list[dict], global_batch: int) -> dict[str, Any]:
    """One method's figures over the ranks: slowest rank per round, median over rounds; rank 0's breakdown."""
    rounds = [max(values) for values in zip(*(r["methods"][name]["ms_rounds"] for r in per_rank), strict=True)]
    ms = median(rounds)
    breakdowns = [profiling.mean_breakdown(r["methods"][name]["steps"]) for r in per_rank]
    first = breakdowns[0]
    step_ms = first.get("step", 0.0)
    return {
        "pairs_per_s": global_batch * 1e3 / ms,
        "ms_per_step": ms,
        "ms_per_step_rounds": rounds,
        "spread": spread(rounds),
        "breakdown_ms": {k: v for k, v in first.items() if k != "step"},
        "breakdown_pct": {k: 100 * v / step_ms for k, v in first.items() if k != "step"} if step_ms else {},
        "profiled_ms_per_step": step_ms,
        "breakdown_ms_by_rank": breakdowns,
        "peak_memory_mb_by_rank": [r["methods"][name]["peak_memory_mb"] for r in per_rank],
    }


LABELS = {"compute": "ours, compute-only", "e2e": "ours, end to end", "reference": "fb/moco reference, compute-only"}


def print_tables(summary: dict[str, dict[str, Any]], memory_kind: str) -> None:
    rows = [
        [
            LABELS[name],
            s["pairs_per_s"],
            s["ms_per_step"],
            f"{100 * s['spread']:.0f}%",
            s["profiled_ms_per_step"],
            max(s["peak_memory_mb_by_rank"]),
        ]
        for name, s in summary.items()
    ]
    headers = ["run", "pairs/s", "ms/step", "spread", "ms/step profiled", f"peak {memory_kind} MB (max rank)"]
    print(format_table(headers, rows))
    stages = [s for s in (*profiling.STAGES, "other") if any(s in m["breakdown_ms"] for m in summary.values())]
    table = []
    for stage in stages:
        row: list[object] = [stage]
        for s in summary.values():
            ms = s["breakdown_ms"].get(stage)
            row += [ms if ms is not None else "-", f"{s['breakdown_pct'][stage]:.1f}%" if ms is not None else "-"]
        table.append(row)
    headers = ["stage (rank 0, ms/step)"]
    for name in summary:
        headers += [name, "%"]
    print()
    print(format_table(headers, table))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=args.world_size)
        if args.compare_reference:
            check_comparable(cfg, args.world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    global_batch = cfg.train.batch_size * args.world_size
    env = environment()
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        out_path = str(Path(tmp) / "ranks.json")
        mp.spawn(worker, args=(args.world_size, free_port(), args, out_path), nprocs=args.world_size, join=True)
        per_rank = json.loads(Path(out_path).read_text())
    first = per_rank[0]
    cuda = first["device"].startswith("cuda")
    memory_kind = "CUDA max_memory_allocated" if cuda else "process peak RSS (ru_maxrss)"
    summary = {name: summarise_method(name, per_rank, global_batch) for name in first["methods"]}
    print(
        f"throughput: {cfg.model.arch} MoCo {cfg.moco.version}, {cfg.data.image_size} px, batch "
        f"{cfg.train.batch_size}/rank x {args.world_size} {first['device'].split(':')[0]} rank(s) "
        f"({first['threads']} thread(s) each), K = {cfg.moco.queue_size}, {first['precision']}, ZeRO "
        f"{cfg.engine.zero_stage}; median of {args.rounds} round(s) of {args.steps} steps; torch {env['torch']}"
    )
    if first["data_backend"]:
        print(f"end to end: the {first['data_backend']} loader, {cfg.data.workers} worker(s) per rank, {cfg.data.path}")
    print_tables(summary, "CUDA" if cuda else "RSS")
    payload: dict[str, Any] = {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": cfg.to_dict(),
        "overrides": args.overrides,
        "world_size": args.world_size,
        "global_batch": global_batch,
        "device": first["device"],
        "precision": first["precision"],
        "threads_per_rank": first["threads"],
        "data_backend": first["data_backend"],
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "profile_steps": args.profile_steps,
        "peak_memory_kind": memory_kind,
        "smoke": args.smoke,
        "results": summary,
        **{f"pairs_per_s_{name}": s["pairs_per_s"] for name, s in summary.items()},
        **env,
    }
    payload["threads"] = first["threads"]
    if "reference" in summary and "compute" in summary:
        rounds = zip(summary["compute"]["ms_per_step_rounds"], summary["reference"]["ms_per_step_rounds"], strict=True)
        by_round = [ref / ours for ours, ref in rounds]
        payload["ratio_vs_reference"] = median(by_round)
        payload["ratio_vs_reference_by_round"] = by_round
        payload["ratio_of_median_pairs_per_s"] = summary["compute"]["pairs_per_s"] / summary["reference"]["pairs_per_s"]
        print(
            f"\nratio_vs_reference = {payload['ratio_vs_reference']:.3f}: our compute-only pairs/s / fb/moco's, median "
            f"over the rounds of each round's ratio (per round: {', '.join(f'{r:.2f}' for r in by_round)}; "
            f"ratio of the median pairs/s {payload['ratio_of_median_pairs_per_s']:.3f})"
        )
    for probe in first["probes_ms"]:
        rounds = [max(values) for values in zip(*(r["probes_ms"][probe] for r in per_rank), strict=True)]
        payload[f"{probe}_ms"] = median(rounds)
        print(f"{probe}: {median(rounds):.1f} ms (slowest rank, median of {len(rounds)} rounds)")
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
