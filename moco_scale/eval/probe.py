"""Linear probe: a linear classifier on a frozen backbone, trained on a labelled input, top-1/top-5 on a held-out one.

    python launchers/linear_probe.py --probe.init=runs/demo --train.progress=false
    python launchers/linear_probe.py --config configs/demo.yaml --probe.init=random
    torchrun --nproc_per_node 2 launchers/linear_probe.py --probe.init=backbone.pt --model.arch=resnet50 \\
        --probe.train_path=/data/train-shards --probe.val_path=/data/val-shards --data.image_size=224

The flags are pretraining's (``--config`` and ``--section.field=value``, one schema); the probe's own live
in the ``probe`` section (``moco_scale.config.ProbeConfig``). ``probe.init`` is a checkpoint (a checkpoint
folder, a run's checkpoints folder or a run directory, as ``checkpoint.resume`` takes them), a file
written by ``launchers/export.py`` (either layout), or ``random`` for the random-init baseline. A
checkpoint's saved ``model.*`` and ``data.*`` settings come between the YAML and the flags, so the
backbone and crop size follow the run unless a flag says otherwise.

The recipe is MoCo's linear evaluation: SGD with momentum 0.9, no weight decay, lr 30 per 256 images
(scaled to the global batch), cosine schedule, random-resized crop + flip for training and a centre
crop for evaluation (``moco_scale/data/labelled.py``). Rank 0 prints one result line and writes
``linear_probe.json`` to ``probe.run_dir`` (default: the checkpoint's run directory, else
``runs/linear_probe``). Bad input exits with code 2 and one line starting ``error:``, before any
process group, model or data loader exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moco_scale import checkpoint
from moco_scale.config import SECTIONS, Config, ConfigError, load_config, parse_cli_overrides
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.labelled import eval_loader, linear_eval_stream, num_classes_of, train_loader
from moco_scale.data.shards import DataError
from moco_scale.data.sources import count_samples, list_inputs
from moco_scale.distributed.comm import init_distributed, shutdown_distributed
from moco_scale.eval.linear import LinearSchedule, evaluate, frozen_backbone, linear_head, train_linear
from moco_scale.optim import linear_scaled_lr
from moco_scale.weights import WeightsError, load_backbone

DEFAULT_RUN_DIR = Path("runs/linear_probe")


@dataclass(frozen=True)
class Probe:
    """A probe run, resolved and checked: the config, the weights (``None``: random init) and the data."""

    cfg: Config
    weights: dict[str, torch.Tensor] | None
    train_inputs: list[str]
    val_inputs: list[str]
    num_classes: int
    run_dir: Path


def _inputs(field: str, path: str, split: str) -> list[str]:
    """The input ``path`` names (``list_inputs``; ``demo``: the demo's ``split``); errors name ``field``."""
    try:
        return list_inputs(str(ensure_demo_shards()[split])) if path == "demo" else list_inputs(path)
    except DataError as err:
        raise DataError(f"{field}: {str(err).removeprefix('data.path: ')}") from None


def _num_classes(given: int, train_inputs: list[str], val_inputs: list[str]) -> int:
    """``given``, else the count the inputs give (``num_classes_of``); a mismatch between them is an error."""
    listed = {split: num_classes_of(inputs) for split, inputs in (("train", train_inputs), ("val", val_inputs))}
    if listed["train"] and listed["val"] and listed["train"] != listed["val"]:
        raise DataError(f"the train input has {listed['train']} classes but the val input {listed['val']}")
    known = listed["train"] or listed["val"]
    if not given:
        if known is None:
            raise ConfigError("probe.num_classes is needed: no manifest.json beside the shards lists class_names")
        return known
    if known is not None and given != known:
        raise ConfigError(f"probe.num_classes={given} but the input has {known} classes")
    return given


def _saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model.*`` and ``data.*`` settings that this version's schema knows, as dotted overrides."""
    known = {section: {f.name for f in dataclasses.fields(type(getattr(Config(), section)))} for section in SECTIONS}
    return {
        f"{section}.{name}": value
        for section in ("model", "data")
        for name, value in (saved.get(section) or {}).items()
        if name in known[section]
    }


def resolve(config: str | None, overrides: dict[str, Any]) -> Probe:
    """Check every input and load the weights; raises a one-line error naming the first bad one."""
    cfg = load_config(config, overrides)
    weights, run_dir = None, DEFAULT_RUN_DIR
    if cfg.probe.init != "random":
        weights, saved = load_backbone(cfg.probe.init)
        cfg = load_config(config, {**_saved_settings(saved), **overrides})
        if Path(cfg.probe.init).is_dir():
            located = checkpoint.locate(cfg.probe.init)
            if located.parent.name == "checkpoints":
                run_dir = located.parent.parent
    train_path = cfg.probe.train_path or cfg.data.path
    train_inputs = _inputs("probe.train_path", train_path, "train")
    val_path = cfg.probe.val_path or cfg.eval.val_path or ("demo" if train_path == "demo" else "")
    if not val_path:
        raise ConfigError("probe.val_path is needed: labelled held-out input to measure the probe on")
    val_inputs = _inputs("probe.val_path", val_path, "val")
    if weights is not None:
        frozen_backbone(cfg.model, cfg.data.image_size, weights)  # do they fit?
    num_classes = _num_classes(cfg.probe.num_classes, train_inputs, val_inputs)
    return Probe(cfg, weights, train_inputs, val_inputs, num_classes, Path(cfg.probe.run_dir or run_dir))


def run(probe: Probe) -> dict[str, Any]:
    """Train and evaluate the probe on every rank; returns the result (the same on every rank)."""
    started = time.perf_counter()
    cfg, recipe, size, workers = probe.cfg, probe.cfg.probe, probe.cfg.data.image_size, probe.cfg.data.workers
    ctx = init_distributed(cfg.engine.device)
    backbone = frozen_backbone(cfg.model, size, probe.weights, cfg.train.seed).to(ctx.device)
    head = linear_head(backbone.feature_dim, probe.num_classes, cfg.train.seed).to(ctx.device)
    global_batch = recipe.batch_size * ctx.world_size
    steps_per_epoch = math.ceil(count_samples(probe.train_inputs) / global_batch)
    schedule = LinearSchedule(
        steps=recipe.max_steps or recipe.epochs * steps_per_epoch,
        peak_lr=linear_scaled_lr(recipe.base_lr, global_batch),
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        warmup_steps=round(recipe.warmup_epochs * steps_per_epoch),
    )
    pin = ctx.device.type == "cuda"
    stream = linear_eval_stream(
        probe.train_inputs, size, recipe.batch_size, ctx.rank, ctx.world_size, cfg.train.seed, cfg.data.shuffle_buffer
    )
    batches = train_loader(stream, workers=workers, pin_memory=pin)
    progress = cfg.train.progress and ctx.is_main
    losses = train_linear(backbone, head, batches, ctx.device, schedule, progress=progress)
    val = eval_loader(probe.val_inputs, size, recipe.batch_size, ctx.rank, ctx.world_size, workers, pin)
    scores = evaluate(backbone, head, val, ctx.device)
    tail = losses[-min(len(losses), steps_per_epoch) :]
    last_loss = torch.tensor([sum(tail) / len(tail)], device=ctx.device)
    dist.all_reduce(last_loss)
    return {
        "top1": scores["top1"],
        "top5": scores["top5"],
        "val_samples": scores["samples"],
        "train_loss_last_epoch": last_loss.item() / ctx.world_size,
        "init": recipe.init,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "small_stem": cfg.model.small_stem,
        "image_size": size,
        "num_classes": probe.num_classes,
        "steps": schedule.steps,
        "epochs": schedule.steps / steps_per_epoch,
        "global_batch": global_batch,
        "peak_lr": schedule.peak_lr,
        "weight_decay": schedule.weight_decay,
        "schedule": schedule.schedule,
        "world_size": ctx.world_size,
        "seconds": time.perf_counter() - started,
    }


def main(config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """``--config`` names a YAML file; ``--local_rank`` is set by the deepspeed launcher (the environment's
    LOCAL_RANK is what counts); every other flag is ``--section.field=value``, the probe's own ``--probe.X``."""
    try:
        probe = resolve(config, parse_cli_overrides(overrides))
    except (ConfigError, DataError, WeightsError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    result = run(probe)
    if dist.get_rank() == 0:
        probe.run_dir.mkdir(parents=True, exist_ok=True)
        out = probe.run_dir / "linear_probe.json"
        out.write_text(json.dumps(result, indent=1))
        print(
            f"linear probe ({result['arch']}, init {result['init']}): top-1 {result['top1']:.2f}%, "
            f"top-5 {result['top5']:.2f}% on {result['val_samples']} images; {result['steps']} steps on "
            f"{result['world_size']} ranks in {result['seconds']:.1f} s; wrote {out}",
            flush=True,
        )
    dist.barrier()
    shutdown_distributed()
