"""Linear probe: a linear classifier on a frozen backbone, trained on labelled shards, top-1/top-5 on held-out ones.

    python launchers/linear_probe.py --init=runs/demo --progress=false
    python launchers/linear_probe.py --init=random --config=configs/demo.yaml
    torchrun --nproc_per_node 2 launchers/linear_probe.py --init=backbone.pt --arch=resnet50 \\
        --train_data=/data/train-shards --val_data=/data/val-shards --image_size=224 --batch_size=32

``--init`` is a checkpoint (a checkpoint folder, a run's checkpoints folder or a run directory, as
``checkpoint.resume`` takes them), a file written by ``launchers/export.py`` (either layout), or
``random`` for the random-init baseline. The model (``--arch``, ``--width``, ``--small_stem``), the
crop size (``--image_size``), the training shards (``--train_data``) and the loader workers come
from these flags, else from the checkpoint's saved config, else from ``--config`` (a pretraining
YAML), else from the config defaults. ``--train_data=demo`` (the default) means the demo's training
shards, and then ``--val_data`` defaults to the demo's held-out ones.

The recipe is MoCo's linear evaluation: SGD with momentum 0.9, no weight decay, lr 30 per 256
images (scaled to the global batch), cosine schedule, random-resized crop + flip for training and
a centre crop for evaluation (``moco_scale/data/labelled.py``). Rank 0 prints one result line and
writes ``linear_probe.json`` to ``--run_dir`` (default: the checkpoint's run directory, else
``runs/linear_probe``). Bad input exits with code 2 and one line starting ``error:``, before any
process group, model or data loader exists.
"""

from __future__ import annotations

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
from moco_scale.config import ConfigError, load_config
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.labelled import eval_loader, num_classes_of, train_loader
from moco_scale.data.shards import DataError, count_samples, list_shards
from moco_scale.distributed.comm import init_distributed, shutdown_distributed
from moco_scale.eval.linear import evaluate, frozen_backbone, linear_head, train_linear
from moco_scale.models import RESNET_SPECS
from moco_scale.optim import linear_scaled_lr
from moco_scale.weights import WeightsError, load_backbone

SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")


class ProbeError(ValueError):
    """A bad flag; the message is one line."""


@dataclass(frozen=True)
class Probe:
    """Everything a probe run needs, resolved and checked."""

    init: str
    weights: dict[str, torch.Tensor] | None
    arch: str
    width: int
    small_stem: bool
    image_size: int
    train_shards: list[str]
    val_shards: list[str]
    num_classes: int
    epochs: int
    max_steps: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    workers: int
    seed: int
    device: str
    run_dir: Path
    progress: bool


def _shards(flag: str, path: str, split: str) -> list[str]:
    """The shards ``path`` names (``demo``: the demo's ``split``); errors name ``flag``."""
    try:
        return list_shards(str(ensure_demo_shards()[split])) if path == "demo" else list_shards(path)
    except DataError as err:
        raise DataError(f"--{flag}: {str(err).removeprefix('data.path: ')}") from None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProbeError(f"--{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ProbeError(f"--{name}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    """fire passes ``--flag=false`` as the string 'false' and ``--flag=False`` as a bool."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ProbeError(f"--{name}: expected true or false, got {value!r}")


def _num_classes(given: int | None, train_shards: list[str], val_shards: list[str]) -> int:
    listed = {split: num_classes_of(shards) for split, shards in (("train", train_shards), ("val", val_shards))}
    if listed["train"] and listed["val"] and listed["train"] != listed["val"]:
        raise DataError(f"the train shards list {listed['train']} classes but the val shards {listed['val']}")
    known = listed["train"] or listed["val"]
    if given is None:
        if known is None:
            raise ProbeError("--num_classes is needed: no manifest.json beside the shards lists class_names")
        return known
    given = _check_int("num_classes", given, 2)
    if known is not None and given != known:
        raise ProbeError(f"--num_classes={given} but the shards' manifest lists {known} classes")
    return given


def resolve(
    init: str,
    config: str | None,
    flags: dict[str, Any],
    num_classes: int | None,
    run_dir: str | None,
    **recipe: Any,
) -> Probe:
    """Check every input and load the weights; raises a one-line error naming the first bad one."""
    settings = load_config(config).to_dict()
    weights, default_run_dir = None, Path("runs/linear_probe")
    if init != "random":
        weights, saved = load_backbone(init)
        for section in ("model", "data"):
            settings[section].update(saved.get(section, {}))
        if Path(init).is_dir():
            located = checkpoint.locate(init)
            if located.parent.name == "checkpoints":
                default_run_dir = located.parent.parent
    model, data = settings["model"], settings["data"]
    values = {
        "arch": model["arch"],
        "width": model["width"],
        "small_stem": model["small_stem"],
        "image_size": data["image_size"],
        "train_data": data["path"],
        "workers": data["workers"],
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if values["arch"] not in RESNET_SPECS:
        raise ProbeError(f"--arch: unknown arch {values['arch']!r}; choices: {', '.join(RESNET_SPECS)}")
    small_stem = _check_bool("small_stem", values["small_stem"])
    if recipe["device"] not in DEVICES:
        raise ProbeError(f"--device: expected one of {', '.join(DEVICES)}, got {recipe['device']!r}")
    if recipe["schedule"] not in SCHEDULES:
        raise ProbeError(f"--schedule: unknown schedule {recipe['schedule']!r}; choices: {', '.join(SCHEDULES)}")
    train_data = str(values["train_data"])
    train_shards = _shards("train_data", train_data, "train")
    val_data = values.get("val_data") or ("demo" if train_data == "demo" else None)
    if val_data is None:
        raise ProbeError("--val_data is needed: labelled held-out shards to measure the probe on")
    val_shards = _shards("val_data", str(val_data), "val")
    backbone_width = _check_int("width", values["width"], 1)
    if weights is not None:
        frozen_backbone(values["arch"], backbone_width, small_stem, weights)  # do they fit?
    if recipe["max_steps"] == 0:
        _check_int("epochs", recipe["epochs"], 1)
    return Probe(
        init=init,
        weights=weights,
        arch=values["arch"],
        width=backbone_width,
        small_stem=small_stem,
        image_size=_check_int("image_size", values["image_size"], 1),
        train_shards=train_shards,
        val_shards=val_shards,
        num_classes=_num_classes(num_classes, train_shards, val_shards),
        epochs=recipe["epochs"],
        max_steps=_check_int("max_steps", recipe["max_steps"], 0),
        batch_size=_check_int("batch_size", recipe["batch_size"], 1),
        lr=_check_number("lr", recipe["lr"], 0.0),
        momentum=_check_number("momentum", recipe["momentum"], 0.0),
        weight_decay=_check_number("weight_decay", recipe["weight_decay"], 0.0),
        schedule=recipe["schedule"],
        warmup_epochs=_check_number("warmup_epochs", recipe["warmup_epochs"], 0.0),
        workers=_check_int("workers", values["workers"], 0),
        seed=_check_int("seed", recipe["seed"], 0),
        device=recipe["device"],
        run_dir=Path(run_dir) if run_dir else default_run_dir,
        progress=_check_bool("progress", recipe["progress"]),
    )


def run(probe: Probe) -> dict[str, Any]:
    """Train and evaluate the probe on every rank; returns the result (the same on every rank)."""
    started = time.perf_counter()
    ctx = init_distributed(probe.device)
    backbone = frozen_backbone(probe.arch, probe.width, probe.small_stem, probe.weights, probe.seed).to(ctx.device)
    head = linear_head(backbone.feature_dim, probe.num_classes, probe.seed).to(ctx.device)
    global_batch = probe.batch_size * ctx.world_size
    steps_per_epoch = math.ceil(count_samples(probe.train_shards) / global_batch)
    steps = probe.max_steps or probe.epochs * steps_per_epoch
    pin = ctx.device.type == "cuda"
    batches = train_loader(
        probe.train_shards,
        probe.image_size,
        probe.batch_size,
        ctx.rank,
        ctx.world_size,
        probe.workers,
        probe.seed,
        pin_memory=pin,
    )
    peak_lr = linear_scaled_lr(probe.lr, global_batch)
    losses = train_linear(
        backbone,
        head,
        batches,
        steps,
        peak_lr,
        ctx.device,
        probe.momentum,
        probe.weight_decay,
        probe.schedule,
        round(probe.warmup_epochs * steps_per_epoch),
        progress=probe.progress and ctx.is_main,
    )
    val = eval_loader(
        probe.val_shards, probe.image_size, probe.batch_size, ctx.rank, ctx.world_size, probe.workers, pin
    )
    scores = evaluate(backbone, head, val, ctx.device)
    tail = losses[-min(len(losses), steps_per_epoch) :]
    last_loss = torch.tensor([sum(tail) / len(tail)], device=ctx.device)
    dist.all_reduce(last_loss)
    return {
        "top1": scores["top1"],
        "top5": scores["top5"],
        "val_samples": scores["samples"],
        "train_loss_last_epoch": last_loss.item() / ctx.world_size,
        "init": probe.init,
        "arch": probe.arch,
        "width": probe.width,
        "small_stem": probe.small_stem,
        "image_size": probe.image_size,
        "num_classes": probe.num_classes,
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "global_batch": global_batch,
        "peak_lr": peak_lr,
        "weight_decay": probe.weight_decay,
        "schedule": probe.schedule,
        "world_size": ctx.world_size,
        "seconds": time.perf_counter() - started,
    }


def main(
    init: str = "random",
    config: str | None = None,
    train_data: str | None = None,
    val_data: str | None = None,
    arch: str | None = None,
    width: int | None = None,
    small_stem: bool | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    epochs: int = 100,
    max_steps: int = 0,
    batch_size: int = 32,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    workers: int | None = None,
    seed: int = 0,
    device: str = "auto",
    run_dir: str | None = None,
    progress: bool = True,
    local_rank: int | None = None,
) -> None:
    """``--batch_size`` is per rank and ``--lr`` per 256 images; ``--max_steps`` > 0 wins over ``--epochs``;
    ``--local_rank`` is set by the deepspeed launcher (the environment's LOCAL_RANK is what counts)."""
    flags = {
        "arch": arch,
        "width": width,
        "small_stem": small_stem,
        "image_size": image_size,
        "train_data": train_data,
        "val_data": val_data,
        "workers": workers,
    }
    try:
        probe = resolve(
            str(init),
            config,
            flags,
            num_classes,
            run_dir,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            seed=seed,
            device=device,
            progress=progress,
        )
    except (ProbeError, ConfigError, DataError, WeightsError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    result = run(probe)
    if dist.get_rank() == 0:
        probe.run_dir.mkdir(parents=True, exist_ok=True)
        out = probe.run_dir / "linear_probe.json"
        out.write_text(json.dumps(result, indent=1))
        print(
            f"linear probe ({probe.arch}, init {probe.init}): top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% "
            f"on {result['val_samples']} images; {result['steps']} steps on {result['world_size']} ranks "
            f"in {result['seconds']:.1f} s; wrote {out}",
            flush=True,
        )
    dist.barrier()
    shutdown_distributed()
