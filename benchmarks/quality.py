"""Does the demo learn like a plain MoCo? The launcher's run beside fb/moco-style reference training.

Both train MoCo v2 on the built-in digits with the protocol of ``configs/demo.yaml`` (ResNet-18, 32 px,
K, m, T, peak lr with warm-up and cosine, weight decay, batch per rank, steps, the same two-view
loader), on 2 gloo ranks, for each seed:

- ours: ``deepspeed --num_gpus 2 launchers/pretrain.py --config configs/demo.yaml``;
- reference: ``benchmarks/reference_moco.py`` (per-parameter EMA loop, gather/broadcast shuffle-BN,
  DDP, fp32) in a loop written here.

Both report the loss every ``log_every`` steps and the kNN top-1 (k=200, T=0.1) of the 300 held-out
digits against the 1,497 training digits, at random init and at the end, through the same
:class:`KnnMonitor`. ``--json`` gets the curves and a summary: mean and spread over seeds of the last
losses and of the final kNN top-1, and their differences (ours - reference).

    python benchmarks/quality.py --seeds 0 1 --json quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import environment, format_table, write_json
from reference_moco import ReferenceMoCo, ReferenceTrainer

from moco_scale.config import Config, load_config
from moco_scale.data.augment import moco_views
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.loader import two_view_batches
from moco_scale.data.shards import list_shards
from moco_scale.dist.comm import free_port, shutdown_distributed
from moco_scale.eval.knn import KnnMonitor
from moco_scale.optim import learning_rate

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="0: the demo's train.max_steps")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="one seed, a few steps: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = [0], 4
    return args


def demo_config(seed: int, steps: int) -> Config:
    overrides: dict[str, Any] = {"train.seed": seed, "data.seed": seed, "engine.precision": "fp32"}
    if steps:
        overrides["train.max_steps"] = steps
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def run_ours(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The launcher, as a user runs it; its metrics.jsonl holds the curve and the kNN figures."""
    t = cfg.train
    cmd = [
        shutil.which("deepspeed") or "deepspeed",
        "--num_gpus",
        str(WORLD),
        "--master_port",
        str(free_port()),
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        f"--train.seed={t.seed}",
        f"--data.seed={cfg.data.seed}",
        "--engine.precision=fp32",
        f"--train.max_steps={t.max_steps}",
        f"--eval.every_steps={t.max_steps}",  # random init and the end
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the launcher failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "losses": {r["step"]: r["loss"] for r in records if "loss" in r},
        "knn_top1": {r["step"]: r["knn_top1"] for r in records if "knn_top1" in r},
    }


def reference_worker(rank: int, port: int, cfg: Config, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)  # the same initial weights and queue on every rank
    m, t, o = cfg.moco, cfg.train, cfg.optim
    model = ReferenceMoCo(cfg.model.arch, m.dim, m.version == "v2", m.queue_size, m.momentum, m.temperature)
    trainer = ReferenceTrainer(model, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    demo = ensure_demo_shards()
    monitor = KnnMonitor(
        list_shards(str(demo["train"])),
        list_shards(str(demo["val"])),
        cfg.data.image_size,
        cfg.eval.batch_size,
        rank,
        WORLD,
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
    )

    def knn() -> float:
        backbone = copy.deepcopy(model.encoder_q)
        backbone.fc = torch.nn.Identity()  # pooled features, as our query backbone gives
        return monitor(backbone)

    knn_top1 = {0: knn()}
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
    batches = two_view_batches(
        cfg.data.backend,
        list_shards(str(demo["train"])),
        moco_views(cfg.data.augmentation, cfg.data.image_size),
        t.batch_size,
        rank,
        WORLD,
        cfg.data.workers,
        cfg.data.seed,
        cfg.data.shuffle_buffer,
        torch.device("cpu"),
        False,
    )
    peak_lr = o.base_lr * t.batch_size * WORLD / 256
    losses = {}
    model.train()
    for step in range(t.max_steps):
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(step, t.max_steps, peak_lr, o.warmup_steps, o.schedule, o.step_milestones)
        view1, view2, _ = next(batches)
        loss = trainer.train_step(view1, view2)
        if (step + 1) % t.log_every == 0 or step + 1 == t.max_steps:
            dist.all_reduce(loss)
            losses[step + 1] = loss.item() / WORLD
    knn_top1[t.max_steps] = knn()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"losses": losses, "knn_top1": knn_top1}))
    shutdown_distributed()


def run_reference(cfg: Config, out_path: Path) -> dict[str, Any]:
    mp.spawn(reference_worker, args=(free_port(), cfg, str(out_path)), nprocs=WORLD, join=True)
    result = json.loads(out_path.read_text())
    return {name: {int(step): value for step, value in curve.items()} for name, curve in result.items()}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean, and (max - min) over the seeds (0 for one seed)."""
    return statistics.fmean(values), max(values) - min(values)


def summarise(runs: dict[str, list[dict[str, Any]]], steps: int, tail: int = 5) -> dict[str, dict[str, float]]:
    """Per implementation: mean and spread over seeds of the mean of the last ``tail`` logged losses,
    of the final kNN top-1 and of the random-init kNN top-1."""
    summary = {}
    for name, seeds in runs.items():
        last_loss = [statistics.fmean([run["losses"][s] for s in sorted(run["losses"])[-tail:]]) for run in seeds]
        final_knn = [run["knn_top1"][steps] for run in seeds]
        init_knn = [run["knn_top1"][0] for run in seeds]
        (loss, loss_spread), (knn, knn_spread), (init, _) = map(mean_spread, (last_loss, final_knn, init_knn))
        summary[name] = {
            "last_loss": loss,
            "last_loss_spread": loss_spread,
            "knn_top1": knn,
            "knn_top1_spread": knn_spread,
            "knn_top1_random_init": init,
        }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = demo_config(seed, args.steps)
            steps = cfg.train.max_steps
            runs["ours"].append(run_ours(cfg, Path(tmp) / f"ours-{seed}"))
            runs["reference"].append(run_reference(cfg, Path(tmp) / f"reference-{seed}.json"))
            print(f"seed {seed}: done", flush=True)
    summary = summarise(runs, steps)
    ours, ref = summary["ours"], summary["reference"]
    rows = [
        [name, s["last_loss"], s["last_loss_spread"], s["knn_top1_random_init"], s["knn_top1"], s["knn_top1_spread"]]
        for name, s in summary.items()
    ]
    print(
        format_table(
            ["run", "last loss", "spread", "kNN top-1 at init (%)", f"kNN top-1 at step {steps} (%)", "spread"],
            rows,
        )
    )
    payload = {
        "benchmark": "quality",
        "environment": environment(),
        "seeds": args.seeds,
        "steps": steps,
        "summary": summary,
        "knn_top1_ours": ours["knn_top1"],
        "loss_difference": ours["last_loss"] - ref["last_loss"],
        "knn_top1_difference": ours["knn_top1"] - ref["knn_top1"],
        "curves": runs,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
