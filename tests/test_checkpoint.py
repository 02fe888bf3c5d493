"""Checkpoints: resolution and damage checks, and a SIGTERM-interrupted 2-rank run that resumes bitwise."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from moco_scale import checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _fake_checkpoint(run_dir: Path, tag: str, world_size: int) -> Path:
    path = checkpoint.checkpoint_root(run_dir) / tag
    path.mkdir(parents=True)
    for rank in range(world_size):
        torch.save({"world_size": world_size}, path / f"rank_{rank:05d}.pt")
    (checkpoint.checkpoint_root(run_dir) / checkpoint.LATEST).write_text(tag)
    return path


def test_resume_resolution(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume("", tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    path = _fake_checkpoint(tmp_path, "step_00000007", 2)
    assert checkpoint.resolve_resume("auto", tmp_path) == path
    assert checkpoint.resolve_resume(str(tmp_path), "elsewhere") == path  # a run directory
    assert checkpoint.resolve_resume(str(path), "elsewhere") == path
    with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint folder"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_damaged_or_mismatched_checkpoints_get_one_line_errors(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path, "step_00000003", 2)
    checkpoint.check_loadable(path, 2)
    with pytest.raises(checkpoint.CheckpointError, match="written by 2 ranks; resuming on 1 is not supported"):
        checkpoint.check_loadable(path, 1)
    (path / "rank_00001.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing rank files rank_00001.pt"):
        checkpoint.check_loadable(path, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no rank_"):
        checkpoint.check_loadable(empty, 2)


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        shutil.which("deepspeed") or "deepspeed",
        "--num_gpus",
        "2",
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--engine.precision=fp32",
        "--train.max_steps=10",
        "--train.log_every=1",
        "--checkpoint.every_steps=5",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return len(lines)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    final = checkpoint.checkpoint_root(run_dir) / "step_00000010"
    model = torch.load(final / "mp_rank_00_model_states.pt", weights_only=False)
    state = {f"module.{k}": v for k, v in model["module"].items()}
    for key, value in model["optimizer"]["state"].items():
        state[f"optimizer.{key}"] = value["momentum_buffer"]
    return state


@pytest.mark.slow
def test_sigterm_then_auto_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    _finish(_launch(tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    proc = _launch(interrupted)
    deadline = time.time() + 500
    while _last_step(interrupted) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in children if any(arg.startswith("--local_rank") for arg in p.cmdline())]
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)  # what SLURM does on preemption: every task gets it
    out = _finish(proc)
    assert "stopped by signal after step" in out
    stopped_at = int((checkpoint.checkpoint_root(interrupted) / checkpoint.LATEST).read_text().split("_")[1])
    assert 3 <= stopped_at < 10, stopped_at
    out = _finish(_launch(interrupted, "--checkpoint.resume=auto"))
    assert "done: 10 steps" in out
    straight, resumed = _state(tmp_path / "straight"), _state(interrupted)
    assert straight.keys() == resumed.keys()
    assert any(k.startswith("module.queue.keys") for k in straight)  # the queue and key encoder are in there
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    kept = sorted(p.name for p in checkpoint.checkpoint_root(interrupted).iterdir())
    saved = sorted({5, stopped_at, 10} if stopped_at >= 5 else {stopped_at, 5, 10})
    assert kept == ["latest", *(f"step_{s:08d}" for s in saved[-2:])]  # keep_last=2, nothing partial left
