"""Typed run configuration: dataclass sections loaded from YAML, overridden as ``--section.field=value``.

Every check that can be made without touching a process group or the data runs in
:func:`validate`, so bad input fails in one line before any compute starts.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moco_scale.data.augment import PRESETS, Augmentation, ViewSpec
from moco_scale.fileio import write_atomically
from moco_scale.models import ARCHS, VIT_SPECS
from moco_scale.observe.loggers import logger_problem


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the culprit."""


@dataclass
class DataConfig:
    path: str = "demo"  # "demo" (built-in shards), a folder of .tar shards, a glob, an ImageFolder root, a list file
    backend: Literal["auto", "dali", "torch"] = "auto"  # auto: DALI when installed
    image_size: int = 224
    augmentation: Literal["v1", "v2", "v3"] = "v2"  # the preset that aug.* starts from
    workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 0


@dataclass
class AugConfig:
    """Each view's augmentation: ``data.augmentation``'s preset, with the fields set as ``aug.view1.X`` or
    ``aug.view2.X`` replaced; ``aug.X`` sets X for both views. A run's config.yaml records every value."""

    view1: Augmentation = field(default_factory=lambda: PRESETS["v2"][0])
    view2: Augmentation = field(default_factory=lambda: PRESETS["v2"][1])

    def views(self, size: int) -> tuple[ViewSpec, ViewSpec]:
        """The two views the loaders make, at ``size`` px."""
        return ViewSpec(size, self.view1), ViewSpec(size, self.view2)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # a ResNet (resnet18 ... resnext101_32x8d) or a ViT (vit_tiny ... vit_huge)
    width: int = 1  # ResNets: SimCLR-style width multiplier, resnet50 with width=2 is R50x2
    small_stem: bool = False  # ResNets: 3x3 conv stem without max-pool, for 32-96 px images
    patch_size: int = 16  # ViTs; data.image_size must be a multiple
    freeze_patch_embed: bool = True  # ViTs: keep the random patch projection (MoCo v3's stability fix)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    channels_last: bool = True  # GPU: model and views; CPU: the key encoder's input only (faster there)


@dataclass
class MocoConfig:
    version: Literal["v1", "v2", "v3"] = "v2"
    dim: int = 128
    mlp_dim: int = 0  # hidden width of the MLP heads; 0: the backbone's feature width (v2); v3 uses 4096
    queue_size: int = 65536  # K; ignored by v3
    shard_queue: bool = False  # each rank holds K / world_size keys (v1/v2); checkpoints store the slices per rank
    momentum: float = 0.999  # m at step 0
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: m -> 1 (v3)
    temperature: float = 0.2
    shuffle_bn: Literal["shuffle", "sync", "none"] = "shuffle"
    bn_groups: int = 8  # virtual BN groups for shuffle-BN in a single process
    key_bn_buffers: Literal["own", "copy", "ema"] = "own"


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    base_lr: float = 0.03  # per 256 images: lr = base_lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[float, float] = (0.6, 0.8)  # step: lr x 0.1 at these fractions of the run
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    trust_coefficient: float = 0.001  # lars only
    grad_clip: float = 0.0  # max global gradient norm; 0: no clipping (the MoCo papers do not clip)


@dataclass
class TrainConfig:
    batch_size: int = 32  # per rank
    max_steps: int = 0  # 0: derived from epochs and the dataset size
    epochs: int = 200
    log_every: int = 10
    run_dir: str = "runs/default"
    seed: int = 0
    progress: bool = True
    loggers: tuple[str, ...] = ("jsonl",)  # jsonl (always on), tensorboard, wandb: each gets every metric
    wandb_project: str = "moco_scale"
    max_bad_steps: int = 10  # stop (non-zero exit, no save) after this many non-finite steps in a row


@dataclass
class EngineConfig:
    backend: Literal["deepspeed", "fsdp"] = "deepspeed"  # fsdp: FSDP2 (fully_shard), launched by torchrun
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = 0  # deepspeed: 0-3 (3 shards the parameters, as fsdp does)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cuda_graph_ema: bool = True
    # fsdp and ZeRO-3: build on the meta device / under zero.Init so no rank holds the whole model, each drawing
    # its shards to the whole build's values; false: every rank builds the whole model first, then it is sharded
    sharded_build: bool = True
    timeout_s: int = 600  # collectives: a rank that died or hangs ends the job after this long (NCCL, gloo)

    def resolved_precision(self, device_type: str) -> str:
        """``precision`` on a device of ``device_type``: ``auto`` is bf16 on a GPU and fp32 on the CPU (bf16
        autocast on a CPU without bf16 units is many times slower than fp32)."""
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: no periodic checkpoints (SIGTERM/SIGUSR1 still save one)
    keep_last: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    resume: str = ""  # "": start fresh; "auto": from <run_dir>/checkpoints/latest if any; or a checkpoint path
    allow_changes: tuple[str, ...] = ()  # fields that may differ from the checkpoint's config (see RESUMABLE_CHANGES)


@dataclass
class EvalConfig:
    every_steps: int = 0  # kNN monitor: 0 off; N > 0 at step 0, every N steps and at the end
    bank_path: str = ""  # labelled input (as data.path) whose features form the kNN bank ("": data.path)
    val_path: str = ""  # labelled held-out input to classify ("": the demo's held-out split, for data.path=demo)
    batch_size: int = 256
    knn_k: int = 200  # fb/moco's kNN monitor: k=200, T=0.1
    knn_temperature: float = 0.1


@dataclass
class ProbeConfig:
    """The linear probe (``launchers/linear_probe.py``), MoCo's linear evaluation on a frozen backbone. It takes
    the backbone from ``model.*`` (a checkpoint's own settings, unless given), the crop from ``data.image_size``,
    the loader from ``data.workers``, the seed from ``train.seed`` and the device from ``engine.device``."""

    init: str = "random"  # a checkpoint, a run directory, an exported file (either layout), or random
    train_path: str = ""  # labelled training input, as data.path ("": data.path)
    val_path: str = ""  # labelled held-out input ("": eval.val_path; for the demo, its held-out split)
    num_classes: int = 0  # 0: from the shards' manifest, the class folders or the list's labels
    epochs: int = 100
    max_steps: int = 0  # > 0 wins over epochs
    batch_size: int = 32  # per rank
    base_lr: float = 30.0  # per 256 images: lr = base_lr * global_batch / 256 (MoCo's linear evaluation)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    run_dir: str = ""  # "": the checkpoint's run directory, else runs/linear_probe


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
VIEWS = tuple(f.name for f in dataclasses.fields(AugConfig))
AUG_FIELDS = tuple(f.name for f in dataclasses.fields(Augmentation))


def _dotted_fields(cls: type, prefix: str) -> list[str]:
    """Every leaf field under ``cls``, dotted: ``train.max_steps``, ``aug.view1.crop_scale``."""
    names = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        names += _dotted_fields(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]
    return names


FIELDS = tuple(_dotted_fields(Config, ""))
# What a resumed run may change without breaking its exact continuation: where it writes, how it logs and
# evaluates, how it checkpoints, and how long it waits. Any other field must match the checkpoint's config
# unless named in checkpoint.allow_changes. (The world size may change too: the checkpoint is re-cut.)
RESUMABLE_CHANGES = frozenset(
    {"train.run_dir", "train.log_every", "train.progress", "train.loggers", "train.max_bad_steps", "engine.timeout_s"}
    | {name for name in FIELDS if name.startswith(("checkpoint.", "eval.", "probe."))}
)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if value is None or isinstance(value, (bool, list, tuple, dict)):
            raise ConfigError(f"{name}: expected text, got {'null' if value is None else repr(value)}")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} for {name}")


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section_name, _, field_name = dotted.partition(".")
    classes = _section_classes()
    if section_name not in classes:
        raise ConfigError(f"unknown section {section_name!r} in {dotted!r}; sections: {', '.join(SECTIONS)}")
    types_ = _field_types(classes[section_name])
    if not field_name:
        raise ConfigError(f"{dotted!r} names a section, not a field; fields: {', '.join(types_)}")
    if section_name == "aug":
        _set_augmentation(cfg.aug, dotted, value)
        return
    if field_name not in types_:
        raise ConfigError(f"unknown field {dotted!r}; fields of {section_name}: {', '.join(types_)}")
    setattr(getattr(cfg, section_name), field_name, _coerce(value, types_[field_name], dotted))


def _set_augmentation(aug: AugConfig, dotted: str, value: Any) -> None:
    """``aug.X`` (both views) or ``aug.viewN.X``."""
    parts = dotted.split(".")[1:]
    views, name = (VIEWS, parts[0]) if len(parts) == 1 else (parts[:1], parts[1] if len(parts) == 2 else "")
    if name in VIEWS or views[0] not in VIEWS or name not in AUG_FIELDS:
        raise ConfigError(
            f"unknown field {dotted!r}: aug takes aug.X (both views) or aug.view1.X / aug.view2.X, "
            f"X one of {', '.join(AUG_FIELDS)}"
        )
    coerced = _coerce(value, typing.get_type_hints(Augmentation)[name], dotted)
    for view in views:
        setattr(aug, view, dataclasses.replace(getattr(aug, view), **{name: coerced}))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        elif not prefix:
            raise ConfigError(f"top-level key {key!r} must be a section; sections: {', '.join(SECTIONS)}")
        else:
            flat[dotted] = value
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ({"train.max_steps": 50, ...}).

    The ``aug.*`` settings go last, in their order, over the preset that ``data.augmentation`` names."""
    settings: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        settings += _flatten(tree).items()
    settings += (overrides or {}).items()
    cfg = Config()
    augmentation = [(dotted, value) for dotted, value in settings if dotted.split(".")[0] == "aug"]
    for dotted, value in settings:
        if dotted.split(".")[0] != "aug":
            _set(cfg, dotted, value)
    cfg.aug = AugConfig(*PRESETS[cfg.data.augmentation])
    for dotted, value in augmentation:
        _set(cfg, dotted, value)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-field checks; ``world_size`` enables the ones that depend on it."""
    m, t, o = cfg.moco, cfg.train, cfg.optim
    for name in t.loggers:
        if problem := logger_problem(name):
            raise ConfigError(problem)
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown arch {cfg.model.arch!r}; choices: {', '.join(ARCHS)}")
    if cfg.model.arch in VIT_SPECS:
        if cfg.model.width != 1 or cfg.model.small_stem:
            raise ConfigError("model.width and model.small_stem are for ResNets; a ViT's size is its arch")
        if cfg.model.patch_size < 1 or cfg.data.image_size % cfg.model.patch_size:
            raise ConfigError(
                f"data.image_size={cfg.data.image_size} must be a multiple of model.patch_size={cfg.model.patch_size}"
            )
    positive = {
        "model.width": cfg.model.width,
        "moco.dim": m.dim,
        "moco.bn_groups": m.bn_groups,
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "train.epochs": t.epochs,
        "data.image_size": cfg.data.image_size,
        "moco.temperature": m.temperature,
        "optim.base_lr": o.base_lr,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.knn_k": cfg.eval.knn_k,
        "eval.knn_temperature": cfg.eval.knn_temperature,
        "train.max_bad_steps": t.max_bad_steps,
        "probe.batch_size": cfg.probe.batch_size,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    non_negative = {
        "train.max_steps": t.max_steps,
        "optim.warmup_steps": o.warmup_steps,
        "optim.warmup_epochs": o.warmup_epochs,
        "moco.mlp_dim": m.mlp_dim,
        "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip,
        "data.workers": cfg.data.workers,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.keep_every": cfg.checkpoint.keep_every,
        "eval.every_steps": cfg.eval.every_steps,
        "train.seed": t.seed,
        "data.seed": cfg.data.seed,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "probe.max_steps": cfg.probe.max_steps,
        "probe.base_lr": cfg.probe.base_lr,
        "probe.weight_decay": cfg.probe.weight_decay,
        "probe.warmup_epochs": cfg.probe.warmup_epochs,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    in_unit_interval = {
        "moco.momentum": m.momentum,
        "optim.momentum": o.momentum,
        "probe.momentum": cfg.probe.momentum,
        "optim.betas[0]": o.betas[0],
        "optim.betas[1]": o.betas[1],
    }
    for name, value in in_unit_interval.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    for view in VIEWS:
        problems = getattr(cfg.aug, view).problems()
        if problems:
            raise ConfigError(f"aug.{view}.{problems[0]}")
    if o.trust_coefficient <= 0:
        raise ConfigError(f"optim.trust_coefficient must be > 0, got {o.trust_coefficient}")
    if cfg.engine.timeout_s < 1:
        raise ConfigError(f"engine.timeout_s must be >= 1, got {cfg.engine.timeout_s}")
    for name in cfg.checkpoint.allow_changes:
        if name not in FIELDS:
            raise ConfigError(f"checkpoint.allow_changes: unknown field {name!r}")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    if cfg.engine.backend == "fsdp" and cfg.engine.zero_stage:
        raise ConfigError("engine.zero_stage is for engine.backend=deepspeed; fsdp always shards (leave it 0)")
    if o.name == "lars" and cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage:
        raise ConfigError(
            "optim.name=lars needs whole parameters for its per-layer trust ratio; DeepSpeed ZeRO >= 1 hands "
            "the optimizer flat partitions: use engine.zero_stage=0 or engine.backend=fsdp"
        )
    if cfg.engine.backend == "fsdp" and cfg.engine.precision == "fp16":
        raise ConfigError("engine.backend=fsdp runs fp32 or bf16; fp16 (loss scaling) needs engine.backend=deepspeed")
    if m.version != "v3" and m.queue_size <= 0:
        raise ConfigError(f"moco.queue_size must be > 0 for MoCo {m.version}, got {m.queue_size}")
    if m.version == "v3" and m.shard_queue:
        raise ConfigError("moco.shard_queue is for v1/v2; MoCo v3 has no queue")
    if m.version == "v3" and m.shuffle_bn == "shuffle":
        raise ConfigError("moco.shuffle_bn=shuffle is for v1/v2; MoCo v3 uses sync or none")
    if cfg.eval.every_steps and not cfg.eval.val_path and cfg.data.path != "demo":
        raise ConfigError("eval.every_steps is set but eval.val_path is empty: name the labelled held-out input")
    if cfg.probe.max_steps == 0 and cfg.probe.epochs < 1:
        raise ConfigError(f"probe.epochs must be >= 1 (or set probe.max_steps), got {cfg.probe.epochs}")
    if cfg.probe.num_classes == 1 or cfg.probe.num_classes < 0:
        raise ConfigError(f"probe.num_classes must be >= 2 (0: from the manifest), got {cfg.probe.num_classes}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if world_size is not None:
        global_batch = t.batch_size * world_size
        if m.version != "v3" and m.queue_size < global_batch:
            raise ConfigError(
                f"moco.queue_size={m.queue_size} is smaller than the global batch "
                f"{global_batch} ({t.batch_size} per rank x {world_size} ranks)"
            )
        if m.shard_queue and m.queue_size % world_size:
            raise ConfigError(f"moco.shard_queue needs moco.queue_size={m.queue_size} divisible by {world_size} ranks")
        if world_size == 1 and m.shuffle_bn == "shuffle" and t.batch_size % m.bn_groups:
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not divisible by moco.bn_groups={m.bn_groups} "
                "(single-process shuffle-BN splits the batch into that many groups)"
            )


def changed_fields(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The fields whose value in ``cfg`` differs from ``saved`` (a checkpoint's ``Config.to_dict()``), but for
    :data:`RESUMABLE_CHANGES`. Fields the checkpoint's version of moco_scale did not have count as unchanged."""
    current = _plain(cfg.to_dict())
    changed = []
    for name in FIELDS:
        if name in RESUMABLE_CHANGES:
            continue
        now = _lookup(current, name)
        if _lookup(saved, name, default=now) != now:
            changed.append(name)
    return changed


def check_resumable(
    saved: dict[str, Any], cfg: Config, source: str, also_changed: dict[str, tuple[Any, Any]] | None = None
) -> None:
    """A one-line :class:`ConfigError` when ``cfg`` changes a field of the checkpoint's config (``saved``) that
    exact continuation depends on, unless ``checkpoint.allow_changes`` names it. ``also_changed``: fields found
    changed otherwise, with their (saved, current) values (``data.backend`` when ``auto`` now resolves to
    another loader)."""
    current = _plain(cfg.to_dict())
    values = {name: (_lookup(saved, name), _lookup(current, name)) for name in changed_fields(saved, cfg)}
    values |= also_changed or {}
    refused = [name for name in values if name not in cfg.checkpoint.allow_changes]
    if refused:
        shown = ", ".join(f"{name} ({values[name][0]!r} -> {values[name][1]!r})" for name in refused)
        raise ConfigError(
            f"{source} was written with other values of {shown}; resuming would not continue that run exactly: "
            f"restore them, or accept the change with --checkpoint.allow_changes={','.join(refused)}"
        )


def _lookup(tree: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """The value at ``dotted`` in a nested dict; ``default`` where the path does not exist."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return _plain(tree)


def parse_cli_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Dotted names for fire's keyword flags: ``--train.max_steps=50`` arrives as ``{"train.max_steps": 50}``,
    ``--train='{max_steps: 50}'`` as ``{"train": {"max_steps": 50}}``; both give ``{"train.max_steps": 50}``."""
    flat: dict[str, Any] = {}
    for key, value in flags.items():
        if isinstance(value, dict):
            flat.update(_flatten({key: value}))
        else:
            flat[key] = value
    return flat


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, written atomically."""
    write_atomically(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_plain(v) for v in tree]
    return tree


__all__ = [
    "ARCHS",
    "Config",
    "ConfigError",
    "load_config",
    "parse_cli_overrides",
    "save_config",
    "validate",
]
