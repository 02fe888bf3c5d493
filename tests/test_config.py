"""Typed configs: YAML + overrides, one-line errors, the shipped paper configs, the generated DeepSpeed JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco_scale.config import (
    Config,
    ConfigError,
    changed_fields,
    load_config,
    parse_cli_overrides,
    save_config,
    validate,
)
from moco_scale.engine.deepspeed import deepspeed_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        CONFIGS / "demo.yaml",
        {
            "train.max_steps": "50",
            "moco.momentum": "0.999",
            "engine.precision": "bf16",
            "train.progress": "false",
            "optim.betas": "(0.9, 0.95)",
            "model.arch": "resnet50",
            "moco.queue_size": 65536,
            "engine.zero_stage": 2,
        },
    )
    assert cfg.train.max_steps == 50 and cfg.moco.momentum == 0.999 and cfg.engine.precision == "bf16"
    assert cfg.train.progress is False and cfg.optim.betas == (0.9, 0.95) and cfg.engine.zero_stage == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bogus.x": 1}, "unknown section 'bogus'.*sections: data, aug, model"),
        ({"aug.crop_scale": [0.5, 1.5]}, r"aug.view1.crop_scale must satisfy 0 < low <= high <= 1, got \[0.5, 1.5\]"),
        ({"aug.view2.crop_scale": [0.9, 0.2]}, r"aug.view2.crop_scale must satisfy 0 < low <= high <= 1"),
        ({"aug.view2.solarize_p": 1.2}, r"aug.view2.solarize_p is a probability, in \[0, 1\], got 1.2"),
        ({"aug.view1.jitter": [0.4, 0.4, 0.4, 0.6]}, r"aug.view1.jitter needs .* hue in \[0, 0.5\]"),
        ({"aug.blur_sigma": [0, 2]}, "aug.view1.blur_sigma must satisfy 0 < low <= high"),
        ({"aug.crop_ratio": [2, 1]}, "aug.view1.crop_ratio must satisfy 0 < low <= high"),
        ({"aug.solarize_threshold": 300}, r"aug.view1.solarize_threshold is a pixel level in \[0, 256\]"),
        ({"aug.flip_p": None}, "aug.flip_p: expected a number, got None"),
        ({"aug.crop_scale": [0.2]}, "aug.crop_scale: expected 2 values, got 1"),
        ({"aug.view3.flip_p": 0}, r"unknown field 'aug.view3.flip_p': aug takes aug.X \(both views\)"),
        ({"aug.view1": 0}, "unknown field 'aug.view1'"),
        ({"aug": 0}, "'aug' names a section, not a field; fields: view1, view2"),
        ({"aug.flip": 0}, "unknown field 'aug.flip'.*flip_p"),
        ({"train.max_stepz": 1}, "unknown field 'train.max_stepz'.*max_steps"),
        ({"train.max_steps": "abc"}, "train.max_steps: expected an integer, got 'abc'"),
        ({"moco.momentum": "fast"}, "moco.momentum: expected a number, got 'fast'"),
        ({"moco.momentum": 1.0}, r"moco.momentum must be in \[0, 1\), got 1.0"),
        ({"moco.momentum": -0.1}, r"moco.momentum must be in \[0, 1\)"),
        ({"model.arch": "resnet51"}, "unknown arch 'resnet51'; choices: resnet18"),
        ({"engine.precision": "fp8"}, "engine.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
        ({"train.progress": "maybe"}, "train.progress: expected true or false"),
        ({"train.batch_size": 0}, "train.batch_size must be > 0"),
        ({"engine.zero_stage": 4}, "engine.zero_stage must be 0, 1, 2 or 3"),
        ({"moco.version": "v3", "moco.shuffle_bn": "shuffle"}, "MoCo v3 uses sync or none"),
        ({"moco.version": "v3", "moco.shard_queue": True}, "moco.shard_queue is for v1/v2; MoCo v3 has no queue"),
        ({"train": 5}, "names a section, not a field"),
        ({"eval.every_steps": 10, "data.path": "/data/shards"}, "eval.every_steps is set but eval.val_path is empty"),
        ({"eval.knn_k": 0}, "eval.knn_k must be > 0"),
        ({"checkpoint.keep_last": 0}, "checkpoint.keep_last must be >= 1"),
    ],
)
def test_bad_values_get_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(CONFIGS / "demo.yaml", overrides)
    assert "\n" not in str(err.value)


def test_world_size_dependent_checks() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", {"moco.queue_size": 100, "train.batch_size": 64})
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="queue_size=100 is smaller than the global batch 128"):
        validate(cfg, world_size=2)
    cfg = load_config(CONFIGS / "demo.yaml", {"train.batch_size": 30, "moco.bn_groups": 4})
    with pytest.raises(ConfigError, match="batch_size=30 is not divisible by moco.bn_groups=4"):
        validate(cfg, world_size=1)
    validate(cfg, world_size=2)  # across ranks the shuffle is an all_to_all: no groups needed
    cfg = load_config(CONFIGS / "demo.yaml", {"moco.shard_queue": "true", "moco.queue_size": 257})
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="moco.shard_queue needs moco.queue_size=257 divisible by 2 ranks"):
        validate(cfg, world_size=2)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "flat.yaml").write_text("max_steps: 3\n")
    with pytest.raises(ConfigError, match="top-level key 'max_steps' must be a section"):
        load_config(tmp_path / "flat.yaml")


def test_paper_defaults() -> None:
    v2 = load_config(CONFIGS / "mocov2_r50.yaml")
    assert (v2.moco.version, v2.moco.queue_size, v2.moco.momentum, v2.moco.temperature) == ("v2", 65536, 0.999, 0.2)
    assert (v2.optim.name, v2.optim.base_lr, v2.optim.schedule, v2.train.epochs) == ("sgd", 0.03, "cosine", 200)
    assert v2.data.augmentation == "v2" and v2.model.arch == "resnet50"
    v1 = load_config(CONFIGS / "mocov1_r50.yaml")
    assert (v1.moco.version, v1.moco.temperature, v1.optim.schedule, v1.data.augmentation) == ("v1", 0.07, "step", "v1")
    v3 = load_config(CONFIGS / "mocov3_r50.yaml")
    assert (v3.moco.version, v3.moco.temperature, v3.moco.momentum, v3.moco.momentum_schedule) == (
        "v3",
        1.0,
        0.99,
        "cosine",
    )
    assert (v3.optim.name, v3.optim.base_lr, v3.optim.warmup_epochs, v3.moco.shuffle_bn) == ("lars", 0.6, 10, "sync")
    assert (v3.moco.dim, v3.moco.mlp_dim) == (256, 4096)
    assert Config().moco.queue_size == 65536 and Config().moco.momentum == 0.999
    for name, arch in (("mocov3_vit_s.yaml", "vit_small"), ("mocov3_vit_b.yaml", "vit_base")):
        vit = load_config(CONFIGS / name)
        assert (vit.model.arch, vit.model.patch_size, vit.model.freeze_patch_embed) == (arch, 16, True)
        assert (vit.optim.name, vit.optim.base_lr, vit.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
        assert (vit.optim.warmup_epochs, vit.train.epochs, vit.train.batch_size * 32) == (40, 300, 4096)
        assert (vit.moco.version, vit.moco.temperature, vit.moco.momentum, vit.moco.momentum_schedule) == (
            "v3",
            0.2,
            0.99,
            "cosine",
        )
        assert (vit.moco.dim, vit.moco.mlp_dim, vit.data.augmentation, vit.data.image_size) == (256, 4096, "v3", 224)


def test_augmentation_starts_from_the_preset_and_takes_both_views_then_one() -> None:
    v3 = load_config(CONFIGS / "mocov3_r50.yaml")
    assert (v3.aug.view1.blur_p, v3.aug.view2.blur_p, v3.aug.view2.solarize_p) == (1.0, 0.1, 0.2)
    assert v3.aug.view1.crop_scale == (0.08, 1.0)
    cfg = load_config(
        CONFIGS / "demo.yaml",
        {"aug.view2.flip_p": "0.25", "aug.crop_scale": "[0.5,1]", "aug.flip_p": 0, "data.augmentation": "v1"},
    )
    # the preset is v1 wherever the flag stands; the shorthand after the per-view flag overrides it, in order
    assert cfg.aug.view1.jitter == cfg.aug.view2.jitter == (0.4, 0.4, 0.4, 0.4) and cfg.aug.view1.blur_p == 0.0
    assert cfg.aug.view1.crop_scale == cfg.aug.view2.crop_scale == (0.5, 1.0)
    assert cfg.aug.view1.flip_p == cfg.aug.view2.flip_p == 0.0
    nested = parse_cli_overrides({"aug": {"view2": {"solarize_p": 0.2}}})  # fire's --aug='{view2: {...}}'
    cfg = load_config(CONFIGS / "demo.yaml", nested)
    assert (cfg.aug.view1.solarize_p, cfg.aug.view2.solarize_p) == (0.0, 0.2)


def test_run_config_records_resolved_augmentation(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "demo.yaml", {"data.augmentation": "v3", "aug.view1.solarize_threshold": 100})
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["aug"]
    assert saved["view2"]["solarize_p"] == 0.2 and saved["view1"]["solarize_threshold"] == 100
    # the demo's own aug.crop_scale outranks the preset it names; the rest comes from the v3 preset
    assert saved["view1"]["crop_scale"] == [0.8, 1.0] and saved["view1"]["blur_sigma"] == [0.1, 2.0]
    assert load_config(tmp_path / "config.yaml") == cfg
    changed = load_config(tmp_path / "config.yaml", {"aug.view2.blur_p": 0.5})
    assert changed_fields(cfg.to_dict(), changed) == ["aug.view2.blur_p"]
    old_checkpoint = {k: v for k, v in cfg.to_dict().items() if k != "aug"}  # written before aug existed
    assert changed_fields(old_checkpoint, changed) == []


def test_fire_style_overrides_and_round_trip(tmp_path: Path) -> None:
    assert parse_cli_overrides({"train.max_steps": 5, "moco": {"dim": 64}}) == {"train.max_steps": 5, "moco.dim": 64}
    cfg = load_config(CONFIGS / "mocov3_r50.yaml", {"train.max_steps": 7})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_deepspeed_json_is_generated_from_the_config() -> None:
    ds = deepspeed_config("bf16", 2, micro_batch=32, world_size=4)
    assert ds["train_batch_size"] == 128 and ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds  # DeepSpeed's own casts break BatchNorm buffers
    assert "torch_autocast" not in deepspeed_config("fp32", 0, 8, 1)
    assert deepspeed_config("fp32", 0, 8, 1)["gradient_clipping"] == 0.0  # not DeepSpeed's default of 1.0
    assert deepspeed_config("fp32", 0, 8, 1, grad_clip=2.5)["gradient_clipping"] == 2.5
    assert deepspeed_config("fp16", 1, 8, 2)["torch_autocast"]["dtype"] == "float16"
