"""launchers/pretrain.py end to end: bad input, and real runs under deepspeed, torchrun and plain python."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from test_loggers import tensorboard_scalars

from moco_scale import checkpoint, train
from moco_scale.data.dali import dali_available
from moco_scale.data.shards import write_shards
from moco_scale.distributed.comm import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launchers" / "pretrain.py"
DEMO = ROOT / "configs" / "demo.yaml"


def _bad_inputs(tmp: Path) -> list[tuple[dict, str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    write_shards([(f"k{i}", b"never decode-checked", 0) for i in range(4)], tmp / "unchecked")
    return [
        (
            {"data.path": str(tmp / "unchecked"), "data.backend": "dali", "eval.every_steps": 0},
            "data.backend=dali: the shards in .*unchecked were not checked with DALI's decoder"
            if dali_available()
            else "data.backend=dali but NVIDIA DALI is not installed",
        ),
        ({"data.path": str(tmp / "missing"), "eval.every_steps": 0}, "data.path: '.*missing' does not exist"),
        ({"data.path": str(tmp / "empty"), "eval.every_steps": 0}, "data.path: folder '.*empty' holds neither .tar"),
        ({"data.path": str(tmp / "empty" / "*.tar"), "eval.every_steps": 0}, "data.path: no .tar shards match"),
        ({"data.path": str(tmp / "empty")}, "eval.every_steps is set but eval.val_path is empty"),
        ({"eval.val_path": str(tmp / "missing")}, "eval.val_path: '.*missing' does not exist"),
        ({"eval.bank_path": str(tmp / "empty")}, "eval.bank_path: folder '.*empty' holds neither .tar"),
        ({"model.arch": "resnet5O"}, "model.arch: unknown arch 'resnet5O'; choices: resnet18"),
        ({"moco.queue_size": 16, "train.batch_size": 32}, "moco.queue_size=16 is smaller than the global batch 32"),
        ({"moco.momentum": 1.5}, r"moco.momentum must be in \[0, 1\), got 1.5"),
        ({"train.batch_size": 30}, "train.batch_size=30 is not divisible by moco.bn_groups=4"),
        ({"train.max_steps": "ten"}, "train.max_steps: expected an integer, got 'ten'"),
        ({"optim.base_lr": "fast"}, "optim.base_lr: expected a number, got 'fast'"),
        ({"trian.max_steps": 5}, "unknown section 'trian'"),
        ({"engine.zero_stage": 4}, "engine.zero_stage must be 0, 1, 2 or 3, got 4"),
        ({"engine.backend": "fsdp", "engine.precision": "fp16"}, "engine.backend=fsdp runs fp32 or bf16"),
        ({"engine.backend": "fsdp", "engine.zero_stage": 2}, "engine.zero_stage is for engine.backend=deepspeed"),
        ({"optim.name": "lars", "engine.zero_stage": 1}, "optim.name=lars needs whole parameters"),
        ({"train.seed": -1}, "train.seed must be >= 0, got -1"),
        ({"data.seed": -3}, "data.seed must be >= 0, got -3"),
        ({"data.shuffle_buffer": -1}, "data.shuffle_buffer must be >= 0, got -1"),
        ({"optim.momentum": 1.0}, r"optim.momentum must be in \[0, 1\), got 1.0"),
        ({"optim.betas": "0.9,1.2"}, r"optim.betas\[1\] must be in \[0, 1\), got 1.2"),
        ({"optim.trust_coefficient": 0}, "optim.trust_coefficient must be > 0, got 0"),
        ({"train.max_bad_steps": 0}, "train.max_bad_steps must be > 0, got 0"),
        ({"engine.timeout_s": 0}, "engine.timeout_s must be >= 1, got 0"),
        ({"data.path": None}, "data.path: expected text, got null"),
        ({"checkpoint.allow_changes": "train.batchsize"}, "checkpoint.allow_changes: unknown field 'train.batchsize'"),
        ({"train.loggers": "[jsonl,tensorbored]"}, "train.loggers: unknown logger 'tensorbored'; choices: jsonl"),
    ]


def test_bad_input_is_rejected_before_any_compute(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for overrides, message in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            train.main(config=str(DEMO), **overrides, **{"train.run_dir": str(tmp_path / "run")})
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, overrides
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert re.search(message, err), (message, err)
        assert not dist.is_initialized() and not (tmp_path / "run").exists()


def _run(cmd: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def test_bad_input_exits_without_traceback(tmp_path: Path) -> None:
    result = _run(
        [sys.executable, str(LAUNCHER), "--config", str(DEMO), "--model.arch=resnet5O", "--moco.momentum=2"],
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "resnet5O" in result.stderr


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_outputs(run_dir: Path, steps: int, stdout: str) -> list[dict]:
    """The training records (the kNN monitor's step-0 record aside), after checking the run's outputs."""
    records = [r for r in _metrics(run_dir) if r["step"] > 0]
    assert records[-1]["step"] == steps
    assert all({"step", "loss", "lr", "pairs_per_s", "inst_acc"} <= r.keys() for r in records)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == steps
    assert f"done: {steps} steps" in stdout
    assert all(r["ms_step"] >= r["ms_query_fwd_bwd"] + r["ms_key_fwd"] + r["ms_ema"] > 0 for r in records)
    for plot in ("metrics.png", "step_time.png"):  # the run's plots
        assert (run_dir / plot).read_bytes().startswith(b"\x89PNG")
    return records


@pytest.mark.slow
def test_deepspeed_two_ranks_demo_learns(tmp_path: Path) -> None:
    """The issue's acceptance run: 60 steps on 2 CPU ranks; once the queue is full, the loss falls."""
    run_dir, port = tmp_path / "run", free_port()
    result = _run(
        [
            shutil.which("deepspeed") or "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            str(LAUNCHER),
            "--config",
            str(DEMO),
            "--train.max_steps=60",
            "--eval.every_steps=50",
            f"--train.run_dir={run_dir}",
            "--train.progress=false",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _check_outputs(run_dir, 60, result.stdout)
    knn = {r["step"]: r["knn_top1"] for r in _metrics(run_dir) if "knn_top1" in r}
    assert sorted(knn) == [0, 50, 60] and all(0 < v <= 100 for v in knn.values())  # random init, every 50, end
    assert all(r["knn_bad_samples"] == 0 for r in _metrics(run_dir) if "knn_top1" in r)  # the digits all decode
    assert "warning:" not in result.stderr  # a healthy run: no collapse, K well below the data
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # nothing left in /dev/shm
    losses = [r["loss"] for r in records]
    first_half_peak = max(losses[: len(losses) // 2])
    last = sum(losses[-3:]) / 3
    assert last < first_half_peak, losses
    tensorboard = tensorboard_scalars(run_dir / "tensorboard")  # configs/demo.yaml logs there too
    assert tensorboard["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert max(r["inst_acc"] for r in records[-4:]) >= max(r["inst_acc"] for r in records[:2]), records


@pytest.mark.slow
def test_torchrun_two_ranks_v3_sync_bn_lars_fsdp(tmp_path: Path) -> None:
    """MoCo v3 under FSDP2 (LARS sees whole, if sharded, parameters there; ZeRO >= 1 would flatten them)."""
    run_dir = tmp_path / "run"
    result = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(LAUNCHER),
            "--config",
            str(DEMO),
            "--moco.version=v3",
            "--moco.shuffle_bn=sync",
            "--data.augmentation=v3",
            "--optim.name=lars",
            "--moco.momentum_schedule=cosine",
            "--engine.backend=fsdp",
            "--train.max_steps=4",
            "--train.log_every=2",
            f"--train.run_dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _check_outputs(run_dir, 4, result.stdout)
    assert records[-1]["momentum"] > records[0]["momentum"]  # the cosine momentum schedule moves


@pytest.mark.slow
def test_single_process_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(
        [
            sys.executable,
            str(LAUNCHER),
            "--config",
            str(DEMO),
            "--train.max_steps=3",
            "--train.log_every=1",
            "--engine.precision=bf16",
            "--eval.every_steps=0",
            "--moco.queue_size=1024",
            f"--train.run_dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _check_outputs(run_dir, 3, result.stdout)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "warning: moco.queue_size=1024 is over a quarter of the 1,497 training samples" in result.stderr


@pytest.mark.slow
def test_two_nodes_over_loopback(tmp_path: Path) -> None:
    """A real 2-node launch on one machine: two torchrun agents, node ranks 0 and 1, one rendezvous."""
    run_dir, port = tmp_path / "run", free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(LAUNCHER),
                "--config",
                str(DEMO),
                "--train.max_steps=4",
                "--train.log_every=2",
                "--eval.every_steps=4",
                "--train.progress=false",
                f"--train.run_dir={run_dir}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "pretraining on 2 ranks (2 nodes x 1, cpu): global batch 64" in outputs[0]
    records = _check_outputs(run_dir, 4, outputs[0])
    assert [r["step"] for r in records] == [2, 4]


@pytest.mark.slow
def test_a_diverged_run_stops_without_saving(tmp_path: Path) -> None:
    """An absurd learning rate: the first step blows the weights up, every later step is non-finite and
    skipped, and after train.max_bad_steps of them in a row the run ends in one line, exit 3, nothing saved."""
    run_dir = tmp_path / "run"
    result = _run(
        [
            sys.executable,
            str(LAUNCHER),
            "--config",
            str(DEMO),
            "--optim.base_lr=1e30",
            "--optim.warmup_steps=0",
            "--train.max_steps=20",
            "--train.max_bad_steps=3",
            "--train.log_every=1",
            "--checkpoint.every_steps=10",
            "--eval.every_steps=0",
            f"--train.run_dir={run_dir}",
        ],
        timeout=600,
    )
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 non-finite steps in a row" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list(checkpoint.checkpoint_root(run_dir).glob("step_*"))
    records = _metrics(run_dir)  # valid JSON throughout: NaN is written as null
    assert records[-1]["loss"] is None and records[-1]["skipped_steps"] == 3, records[-1]
