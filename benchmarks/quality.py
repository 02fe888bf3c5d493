"""Does moco_scale learn like fb/moco? Four arms on one protocol, data path included, over seeds.

Arms, each on 2 gloo ranks, fp32:

- ``ours-dali``, ``ours-torch``: ``deepspeed --num_gpus 2 launchers/pretrain.py --config configs/demo.yaml``
  with the protocol's flags and ``--data.backend=dali`` / ``torch``;
- ``ref-our-loader``: ``benchmarks/reference_moco.py`` (fb/moco's way: per-parameter EMA loop,
  gather/broadcast shuffle-BN, DDP) trained in a loop written here, fed by our loader (``data.backend=auto``);
  on the ``vit`` protocol ``benchmarks/reference_mocov3.py`` instead (moco-v3's ViT, heads, loss and loop);
- ``ref-pil``: the same reference fed by fb/moco's data path (``benchmarks/reference_data.py``: the demo's
  training images unpacked into an ImageFolder tree, PIL transforms from the same augmentation spec,
  a DistributedSampler).
- ``ref-our-init`` (an A/B, only when named in ``--arms``): ``ref-our-loader`` started from our launcher's
  initial module (``our_initial_state``) instead of its own draw, so that it differs from ``ours-dali`` in the
  training step's code alone.

Protocols (``--protocols``): ``demo`` is ``configs/demo.yaml`` as it is; ``divergent`` is the one on which
fb/moco's code and ours were seen to part (issue 13): 64 px digits, ResNet-18, K=256, T=0.1, m=0.99, SGD
lr 0.06 at the global batch of 128, weight decay 5e-4, cosine without warm-up, the v2 recipe, 600 steps,
64 per rank. ``vit`` is ``configs/demo_vit.yaml`` as it is: MoCo v3 on vit_tiny (8 px patches at 32 px).

Every arm logs the loss and the instance accuracy every ``train.log_every`` steps and the kNN top-1
(k=200, T=0.1, the 300 held-out digits against the 1,497 training ones, one :class:`KnnMonitor`) at
random init and at the end. ``--json`` gets the curves, and per protocol and arm the mean and spread
over seeds of the last losses, the final instance accuracy and the final kNN top-1; ``--plot`` draws
the loss and instance-accuracy curves (mean over seeds) per protocol.

    python benchmarks/quality.py --seeds 0 1 2 --json quality.json --plot quality.png
    python benchmarks/quality.py ... --resume quality.json.partial   # keeps the arms that finished
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import environment, format_table, write_json
from reference_data import image_folder_batches, unpack_to_image_folder
from reference_moco import ReferenceMoCo, ReferenceTrainer
from reference_mocov3 import ReferenceMoCoV3, ReferenceV3Trainer

from moco_scale.config import Config, load_config
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.loader import two_view_batches
from moco_scale.data.shards import StreamSpec, list_shards
from moco_scale.distributed.comm import free_port, shutdown_distributed
from moco_scale.eval.knn import KnnMonitor
from moco_scale.moco import MoCo
from moco_scale.models import build_backbone
from moco_scale.optim import learning_rate, linear_scaled_lr

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
ARMS = ("ours-dali", "ours-torch", "ref-our-loader", "ref-pil", "ref-our-init")  # the last: an A/B, not a default
DEFAULT_ARMS = ARMS[:4]
PROTOCOLS: dict[str, dict[str, Any]] = {
    "demo": {},
    "divergent": {
        "data.image_size": 64,
        "data.augmentation": "v2",
        "aug.crop_scale": (0.2, 1.0),  # the v2 recipe whole: configs/demo.yaml's own aug settings come after the preset
        "aug.blur_p": 0.5,
        "model.arch": "resnet18",
        "moco.queue_size": 256,
        "moco.temperature": 0.1,
        "moco.momentum": 0.99,
        "optim.base_lr": 0.12,  # lr 0.06 at the global batch of 128
        "optim.weight_decay": 5e-4,
        "optim.warmup_steps": 0,
        "optim.schedule": "cosine",
        "train.batch_size": 64,
        "train.max_steps": 600,
    },
    "vit": {},
}
CONFIGS = {"demo": "demo.yaml", "divergent": "demo.yaml", "vit": "demo_vit.yaml"}  # what each protocol's flags change


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", choices=tuple(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--steps", type=int, default=0, help="0: the protocol's train.max_steps")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="", help="PNG of the loss and instance-accuracy curves")
    parser.add_argument("--resume", default="", help="an earlier --json (or .partial): its runs are kept")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one seed, the vit protocol (both references run: moco-v3 here, fb/moco in throughput.py), 4 steps",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.protocols = [0], 4, ["vit"]
    return args


def protocol_flags(protocol: str, seed: int, steps: int) -> dict[str, Any]:
    """The launcher flags (beyond the protocol's config file) of one protocol and seed."""
    flags = {**PROTOCOLS[protocol], "train.seed": seed, "data.seed": seed, "engine.precision": "fp32"}
    if steps:
        flags["train.max_steps"] = steps
    return flags


def run_ours(config: Path, flags: dict[str, Any], backend: str, run_dir: Path) -> dict[str, Any]:
    """The launcher, as a user runs it; its metrics.jsonl holds the curves and the kNN figures."""
    steps = load_config(config, flags).train.max_steps
    flags = {**flags, "data.backend": backend, "eval.every_steps": steps, "train.progress": "false"}
    flags["train.run_dir"] = str(run_dir)
    cmd = [
        shutil.which("deepspeed") or "deepspeed",
        "--num_gpus",
        str(WORLD),
        "--master_port",
        str(free_port()),
        "launchers/pretrain.py",
        "--config",
        str(config),
        *(f"--{name}={value}" for name, value in flags.items()),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the launcher failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: {r["step"]: r[key] for r in records if key in r} for key in ("loss", "inst_acc", "knn_top1")}


def reference(
    cfg: Config, initial: dict[str, torch.Tensor] | None = None
) -> tuple[Callable[[torch.Tensor, torch.Tensor], Any], Callable[[], torch.nn.Module]]:
    """The reference of ``cfg.moco.version`` (fb/moco's for v1/v2, moco-v3's for v3): its training step, which
    sets the learning rate (and the key momentum) of each step itself, and its backbone for the kNN monitor.
    ``initial``: a v1/v2 module state to start from (``our_initial_state``) instead of its own draw."""
    m, t, o = cfg.moco, cfg.train, cfg.optim
    peak_lr = linear_scaled_lr(o.base_lr, t.batch_size * WORLD)
    if m.version == "v3":
        if initial is not None:
            raise ValueError("the initialisation A/B (ref-our-init) is written for MoCo v1/v2")
        v3 = ReferenceMoCoV3(cfg.model.arch, cfg.data.image_size, cfg.model.patch_size, m.dim, m.mlp_dim, m.temperature)
        trainer = ReferenceV3Trainer(v3, peak_lr, o.weight_decay, o.warmup_steps, t.max_steps, m.momentum)

        def v3_backbone() -> torch.nn.Module:
            backbone = copy.deepcopy(v3.base_encoder)
            backbone.head = torch.nn.Identity()  # the class token after the final norm, as our ViT gives
            return backbone

        return trainer.train_step, v3_backbone
    v2 = ReferenceMoCo(cfg.model.arch, m.dim, m.version == "v2", m.queue_size, m.momentum, m.temperature)
    if initial is not None:
        missing, unexpected = v2.load_state_dict(initial, strict=False)
        if missing != ["queue_ptr"] or unexpected:
            raise ValueError(f"our module does not map onto the reference's: missing {missing}, extra {unexpected}")
    v2_trainer = ReferenceTrainer(v2, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    steps = itertools.count()

    def train_step(view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lr = learning_rate(next(steps), t.max_steps, peak_lr, o.warmup_steps, o.schedule, o.step_milestones)
        for group in v2_trainer.optimizer.param_groups:
            group["lr"] = lr
        return v2_trainer.train_step(view1, view2)

    def v2_backbone() -> torch.nn.Module:
        backbone = copy.deepcopy(v2.encoder_q)
        backbone.fc = torch.nn.Identity()  # pooled features, as our query backbone gives
        return backbone

    return train_step, v2_backbone


def our_initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """Our launcher's initial MoCo v1/v2 module for ``cfg`` (the whole build, drawn by name from the seed) under the
    reference's names: ``encoder_*.backbone.X`` -> ``encoder_*.X``, the head -> ``fc``, the queue transposed."""
    ours = MoCo(build_backbone(cfg.model, cfg.data.image_size), cfg.moco, world_size=WORLD, cuda_graph_ema=False)
    ours.initialise(cfg.train.seed)
    state = {"queue": ours.queue.keys.T.contiguous()}
    for name, tensor in ours.state_dict().items():
        if not name.startswith("queue."):
            state[name.replace(".backbone.", ".").replace(".head.", ".fc.")] = tensor
    return state


def reference_worker(rank: int, port: int, cfg: Config, loader: str, image_folder: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)  # the same initial weights (and queue) on every rank
    t = cfg.train
    train_step, backbone = reference(cfg, our_initial_state(cfg) if loader == "ours-init" else None)
    demo = ensure_demo_shards()
    train, val = list_shards(str(demo["train"])), list_shards(str(demo["val"]))
    monitor = KnnMonitor(train, val, cfg.data.image_size, cfg.eval, rank, WORLD)

    def knn() -> float:
        return monitor(backbone())

    curves: dict[str, dict[int, float]] = {"loss": {}, "inst_acc": {}, "knn_top1": {0: knn()}}
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
    views = cfg.aug.views(cfg.data.image_size)
    if loader == "pil":
        batches = image_folder_batches(
            Path(image_folder), views, t.batch_size, rank, WORLD, cfg.data.workers, cfg.data.seed
        )
    else:
        shards = list_shards(str(demo["train"]))
        stream = StreamSpec(shards, views, t.batch_size, rank, WORLD, cfg.data.seed, cfg.data.shuffle_buffer)
        batches = two_view_batches(cfg.data.backend, stream, workers=cfg.data.workers, device=torch.device("cpu"))
    for step in range(t.max_steps):
        view1, view2, _ = next(batches)
        loss, inst_acc = train_step(view1, view2)
        if (step + 1) % t.log_every == 0 or step + 1 == t.max_steps:
            stats = torch.stack([loss, inst_acc])
            dist.all_reduce(stats)
            curves["loss"][step + 1], curves["inst_acc"][step + 1] = (stats / WORLD).tolist()
    curves["knn_top1"][t.max_steps] = knn()
    if rank == 0:
        Path(out_path).write_text(json.dumps(curves))
    shutdown_distributed()


def run_reference(cfg: Config, loader: str, image_folder: Path, out_path: Path) -> dict[str, Any]:
    out_path.parent.mkdir(parents=True, exist_ok=True)  # the first arm of a seed may be a reference
    mp.spawn(reference_worker, args=(free_port(), cfg, loader, str(image_folder), str(out_path)), nprocs=WORLD)
    result = json.loads(out_path.read_text())
    return {name: {int(step): value for step, value in curve.items()} for name, curve in result.items()}


def run_arm(arm: str, protocol: str, flags: dict[str, Any], work: Path, image_folder: Path) -> dict[str, Any]:
    config = ROOT / "configs" / CONFIGS[protocol]
    if arm.startswith("ours-"):
        return run_ours(config, flags, arm.removeprefix("ours-"), work / arm)
    cfg = load_config(config, flags)
    loader = {"ref-pil": "pil", "ref-our-init": "ours-init"}.get(arm, "ours")  # ours-init: our loader too
    return run_reference(cfg, loader, image_folder, work / f"{arm}.json")


def one_line(run: dict[str, Any]) -> str:
    """One arm's run: its last logged loss and instance accuracy, and its kNN top-1 at init and at the end."""
    last = max(run["loss"])
    knn = run["knn_top1"]
    return (
        f"loss {run['loss'][last]:.3f} and inst_acc {run['inst_acc'][last]:.3f} at step {last}; "
        f"kNN {knn[min(knn)]:.1f} -> {knn[max(knn)]:.1f}"
    )


def earlier_runs(path: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The finished runs in an earlier ``--json`` (or its ``.partial``), by (protocol, arm, seed)."""
    if not path:
        return {}
    earlier = json.loads(Path(path).read_text())
    found = {}
    for protocol, arms in earlier["curves"].items():
        for arm, seeds in arms.items():
            for seed, run in zip(earlier["seeds"], seeds, strict=False):  # each arm ran its seeds in order
                curves = {name: {int(step): value for step, value in curve.items()} for name, curve in run.items()}
                found[protocol, arm, seed] = curves
    return found


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean, and (max - min) over the seeds (0 for one seed)."""
    return statistics.fmean(values), max(values) - min(values)


def summarise(seeds: list[dict[str, Any]], tail: int = 5) -> dict[str, float]:
    """Mean and spread over seeds of the mean of the last ``tail`` logged losses, of the final instance
    accuracy and of the final kNN top-1; the mean kNN top-1 at random init."""
    last_loss = [statistics.fmean([run["loss"][s] for s in sorted(run["loss"])[-tail:]]) for run in seeds]
    final_acc = [run["inst_acc"][max(run["inst_acc"])] for run in seeds]
    final_knn = [run["knn_top1"][max(run["knn_top1"])] for run in seeds]
    init_knn = [run["knn_top1"][0] for run in seeds]
    summary = {}
    for name, values in (("last_loss", last_loss), ("inst_acc", final_acc), ("knn_top1", final_knn)):
        summary[name], summary[f"{name}_spread"] = mean_spread(values)
    summary["knn_top1_random_init"] = statistics.fmean(init_knn)
    return summary


def plot(runs: dict[str, dict[str, list[dict[str, Any]]]], path: str) -> None:
    """Loss and instance accuracy against the step, mean over seeds, one row per protocol."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.6 * len(runs)))
    axes = figure.subplots(len(runs), 2, squeeze=False)
    for (loss_ax, acc_ax), (protocol, arms) in zip(axes, runs.items(), strict=True):
        for arm, seeds in arms.items():
            for ax, key in ((loss_ax, "loss"), (acc_ax, "inst_acc")):
                steps = sorted(seeds[0][key])
                ax.plot(steps, [statistics.fmean(run[key][s] for run in seeds) for s in steps], label=arm)
        loss_ax.set_title(f"{protocol}: InfoNCE loss (mean of {len(seeds)} seeds)")
        acc_ax.set_title(f"{protocol}: instance accuracy")
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        loss_ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p: {arm: [] for arm in args.arms} for p in args.protocols}
    done = earlier_runs(args.resume)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image_folder = unpack_to_image_folder(list_shards(str(ensure_demo_shards()["train"])), work / "image_folder")
        for protocol in args.protocols:
            for seed in args.seeds:
                for arm in args.arms:
                    run = done.get((protocol, arm, seed))
                    if run is None:
                        flags = protocol_flags(protocol, seed, args.steps)
                        run = run_arm(arm, protocol, flags, work / f"{protocol}-{seed}", image_folder)
                    runs[protocol][arm].append(run)
                    print(f"{protocol}, seed {seed}, {arm}: {one_line(run)}", flush=True)
                    if args.json:  # what has finished so far, should the rest not
                        Path(args.json + ".partial").write_text(json.dumps({"seeds": args.seeds, "curves": runs}))
    summary = {p: {arm: summarise(seeds) for arm, seeds in arms.items()} for p, arms in runs.items()}
    columns = ("last_loss", "last_loss_spread", "inst_acc", "inst_acc_spread", "knn_top1_random_init", "knn_top1")
    rows = [
        [protocol, arm, *(s[c] for c in columns), s["knn_top1_spread"]]
        for protocol, arms in summary.items()
        for arm, s in arms.items()
    ]
    headers = ["protocol", "arm", "last loss", "spread", "inst_acc", "spread", "kNN at init", "kNN at end", "spread"]
    print(format_table(headers, rows))
    first = summary[args.protocols[0]]
    payload = {
        "benchmark": "quality",
        "environment": environment(),
        "seeds": args.seeds,
        "protocols": {p: PROTOCOLS[p] for p in args.protocols},
        "summary": summary,
        "knn_top1_ours": first[args.arms[0]]["knn_top1"],
        "curves": runs,
    }
    write_json(args.json, payload)
    if args.plot:
        plot(runs, args.plot)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
