"""Resume refuses what it cannot continue exactly: a changed config field is a one-line error naming it, unless
checkpoint.allow_changes accepts it; then the loader restarts at the same global sample count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco_scale import checkpoint
from moco_scale.config import ConfigError, changed_fields, check_resumable, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_changed_fields_leave_out_what_a_resume_may_change() -> None:
    saved = load_config(ROOT / "configs" / "demo.yaml").to_dict()
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        {"train.batch_size": 16, "data.workers": 3, "train.log_every": 7, "eval.every_steps": 0, "train.run_dir": "x"},
    )
    assert changed_fields(saved, cfg) == ["data.workers", "train.batch_size"]
    del saved["data"]["workers"]  # a field the checkpoint's version did not have counts as unchanged
    assert changed_fields(saved, cfg) == ["train.batch_size"]


def test_check_resumable_names_each_field_and_the_flag() -> None:
    saved = load_config(ROOT / "configs" / "demo.yaml").to_dict()
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"data.seed": 5, "optim.betas": "0.8,0.99"})
    with pytest.raises(ConfigError) as err:
        check_resumable(saved, cfg, "ckpt", also_changed={"data.backend": ("dali", "torch")})
    message = str(err.value)
    assert "\n" not in message
    assert "data.seed (0 -> 5)" in message and "optim.betas ([0.9, 0.999] -> [0.8, 0.99])" in message
    assert "data.backend ('dali' -> 'torch')" in message
    assert message.endswith("--checkpoint.allow_changes=data.seed,optim.betas,data.backend")
    allowed = load_config(
        ROOT / "configs" / "demo.yaml",
        {"data.seed": 5, "optim.betas": "0.8,0.99", "checkpoint.allow_changes": "data.seed,optim.betas,data.backend"},
    )
    check_resumable(saved, allowed, "ckpt", also_changed={"data.backend": ("dali", "torch")})


def _pretrain(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--data.backend=torch",
        "--data.workers=2",
        "--eval.every_steps=0",
        "--train.log_every=1",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _loader_state(run_dir: Path, step: int) -> dict:
    file = checkpoint.checkpoint_root(run_dir) / f"step_{step:08d}" / "rank_00000.pt"
    return torch.load(file, weights_only=True)["loader"]


@pytest.mark.slow
def test_a_changed_loader_layout_is_refused_or_restarts_at_the_global_sample_count(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _pretrain(run_dir, "--train.max_steps=3", "--checkpoint.every_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _pretrain(run_dir, "--train.max_steps=6", "--checkpoint.resume=auto", "--data.workers=1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert "data.workers (2 -> 1)" in refused.stderr and "train.max_steps (3 -> 6)" in refused.stderr
    assert "--checkpoint.allow_changes=data.workers,train.max_steps" in refused.stderr
    resumed = _pretrain(
        run_dir,
        "--train.max_steps=6",
        "--checkpoint.every_steps=3",
        "--checkpoint.resume=auto",
        "--data.workers=1",
        "--checkpoint.allow_changes=data.workers,train.max_steps",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: 6 steps" in resumed.stdout
    # 3 batches of 32 before the change, 3 after: the count carried over and went on.
    assert _loader_state(run_dir, 3)["samples"] == 3 * 32
    assert _loader_state(run_dir, 6)["samples"] == 6 * 32
