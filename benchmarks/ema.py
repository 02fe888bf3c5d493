"""Fused momentum (EMA) update of the key encoder against a per-parameter loop and a plain copy.

    python benchmarks/ema.py [--arch resnet50] [--steps N] [--warmup N] [--repeats N] [--threads N]
                             [--json PATH] [--smoke]

Three ways to touch the key encoder's parameters, timed side by side (interleaved rounds, the
median over rounds is reported):

- ``fused``: ``MomentumUpdater(query, key, buffer_policy="own")(m)``, the code under test
  (one ``_foreach_lerp_`` on the CPU; a replayed CUDA graph on a GPU);
- ``loop``: one ``k.mul_(m).add_(q, alpha=1 - m)`` per parameter, the textbook MoCo update;
- ``copy``: ``torch._foreach_copy_(key, query)``, the same tensors copied once: the floor any
  update that must read the query parameters and write the key parameters is measured against.

"GB/s effective" divides the bytes each operation must touch at least by its time: an EMA
reads key and query and writes key (3 x the parameter bytes); a copy reads query and writes
key (2 x). So a purely bandwidth-bound EMA costs 1.5 copies.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from moco_scale.moco.momentum import MomentumUpdater
from moco_scale.models import build_resnet

try:
    from benchmarks._common import environment, format_table, median, spread, time_interleaved, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/ema.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, time_interleaved, write_json

MOMENTUM = 0.999
COPY_METHOD = "torch._foreach_copy_(key_params, query_params): same tensors, same bytes, one multi-tensor copy"
# Bytes each method must at least read + write, in units of the parameter bytes.
MIN_TRAFFIC = {"fused": 3, "loop": 3, "copy": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--steps", type=int, default=20, help="timed calls per method per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per method first")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="resnet18, 3 steps: a few seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.arch, args.steps, args.warmup, args.repeats = "resnet18", 3, 1, 2
    return args


def check_same_update(query: torch.nn.Module, key: torch.nn.Module, device: torch.device) -> float:
    """Largest difference between one fused step and one loop step from the same start."""
    a, b = copy.deepcopy(key).to(device), copy.deepcopy(key).to(device)
    q = query.to(device)
    MomentumUpdater(q, a, buffer_policy="own")(MOMENTUM)
    with torch.no_grad():
        for k, p in zip(b.parameters(), q.parameters(), strict=True):
            k.mul_(MOMENTUM).add_(p, alpha=1 - MOMENTUM)
    diffs = [(x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True)]
    return max(diffs)


def bench_device(
    query: torch.nn.Module, key: torch.nn.Module, device: torch.device, args: argparse.Namespace
) -> dict[str, object]:
    query, key = query.to(device), key.to(device)
    q_params, k_params = list(query.parameters()), list(key.parameters())
    fused = MomentumUpdater(query, key, buffer_policy="own")  # builds its CUDA graph on the first call

    @torch.no_grad()
    def loop() -> None:
        for k, q in zip(k_params, q_params, strict=True):
            k.mul_(MOMENTUM).add_(q, alpha=1 - MOMENTUM)

    @torch.no_grad()
    def plain_copy() -> None:
        torch._foreach_copy_(k_params, q_params)

    methods = {"fused": lambda: fused(MOMENTUM), "loop": loop, "copy": plain_copy}
    samples = time_interleaved(methods, args.steps, args.warmup, args.repeats, device=device)
    ms = {name: median(values) for name, values in samples.items()}
    param_bytes = sum(p.numel() * p.element_size() for p in q_params)
    return {
        "device": str(device),
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "fused_uses_cuda_graph": fused.use_graph,
        "ms": ms,
        "ms_samples": samples,
        "spread": {name: spread(values) for name, values in samples.items()},
        "gbps_effective": {name: MIN_TRAFFIC[name] * param_bytes / (ms[name] * 1e-3) / 1e9 for name in ms},
        "ratio_vs_copy": ms["fused"] / ms["copy"],
        "ratio_vs_loop": ms["fused"] / ms["loop"],
        "max_abs_diff_fused_vs_loop": check_same_update(query, key, device),
    }


def print_result(arch: str, result: dict[str, object], param_bytes: int) -> None:
    ms, gbps = result["ms"], result["gbps_effective"]
    rows = [
        [name, ms[name], f"{MIN_TRAFFIC[name]}x{param_bytes / 1e6:.1f} MB", gbps[name], ms[name] / ms["copy"]]
        for name in ("fused", "loop", "copy")
    ]
    headers = ["method", "ms/step", "min. bytes moved", "GB/s effective", "ratio vs copy"]
    print(f"\n{arch} on {result['device']} ({result['timer']}, fused CUDA graph: {result['fused_uses_cuda_graph']})")
    print(format_table(headers, rows))
    print(
        f"ratio_vs_copy = {result['ratio_vs_copy']:.3f}  ratio_vs_loop = {result['ratio_vs_loop']:.3f}  "
        f"spread (max-min)/median: " + ", ".join(f"{k} {v:.0%}" for k, v in result["spread"].items())
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    query = build_resnet(args.arch)
    key = copy.deepcopy(query)
    with torch.no_grad():  # start the key away from the query, as after some training
        for p in key.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    param_count = sum(p.numel() for p in query.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in query.parameters())
    env = environment()
    print(
        f"EMA benchmark: {args.arch}, {param_count / 1e6:.2f} M parameters in {len(list(query.parameters()))} "
        f"tensors, {param_bytes / 1e6:.1f} MB; m = {MOMENTUM}; torch {env['torch']}, {env['threads']} threads, "
        f"{env['cpu']}; {args.repeats} x {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"copy method: {COPY_METHOD}")
    results = {"cpu": bench_device(query, key, torch.device("cpu"), args)}
    print_result(args.arch, results["cpu"], param_bytes)
    if torch.cuda.is_available():
        results["cuda"] = bench_device(copy.deepcopy(query), copy.deepcopy(key), torch.device("cuda"), args)
        print_result(args.arch, results["cuda"], param_bytes)
    else:
        print("\nCUDA: not available here; GPU rows pending.")
    cpu = results["cpu"]
    payload = {
        "benchmark": "ema",
        "arch": args.arch,
        "param_count": param_count,
        "param_tensors": len(list(query.parameters())),
        "bytes": param_bytes,
        "momentum": MOMENTUM,
        "copy_method": COPY_METHOD,
        "min_traffic_multiple_of_bytes": MIN_TRAFFIC,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "ratio_vs_copy": cpu["ratio_vs_copy"],
        "ratio_vs_loop": cpu["ratio_vs_loop"],
        "ms": cpu["ms"],
        "results": results,
        "cuda_ratio_vs_copy": results["cuda"]["ratio_vs_copy"] if "cuda" in results else None,
        **env,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
