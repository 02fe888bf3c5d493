"""The linear probe: separable vs shuffled labels, gradient averaging on 2 gloo ranks against one process, the
weight sources, the training view, bad input, and launchers/linear_probe.py end to end under torchrun."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from torch import nn

from moco_scale.config import ModelConfig
from moco_scale.data.labelled import eval_loader, linear_eval_stream, train_loader
from moco_scale.data.shards import list_shards
from moco_scale.eval import probe
from moco_scale.eval.linear import LinearSchedule, evaluate, frozen_backbone, linear_head, train_linear
from moco_scale.models import build_resnet
from moco_scale.weights import WeightsError, load_backbone

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launchers" / "linear_probe.py"
DEMO = ROOT / "configs" / "demo.yaml"
CPU = torch.device("cpu")


def _clusters(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Points near one of 10 class centres in 32 dimensions: linearly separable."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    return torch.eye(32)[labels] * 5 + torch.randn(n, 32, generator=generator), labels


def _endless(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(0, len(x), (batch,), generator=generator)
        yield x[index], y[index]


def _probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor) -> dict:
    head = linear_head(32, 10)
    train_linear(nn.Identity(), head, _endless(train_x, train_y, 64, 0), CPU, LinearSchedule(300, peak_lr=0.5))
    return evaluate(nn.Identity(), head, [(val_x[i : i + 100], val_y[i : i + 100]) for i in range(0, 500, 100)], CPU)


@pytest.mark.usefixtures("one_thread")
def test_separable_features_beat_chance_and_shuffled_labels_give_chance() -> None:
    generator = torch.Generator().manual_seed(0)
    (train_x, train_y), (val_x, val_y) = _clusters(1000, generator), _clusters(500, generator)
    separable = _probe(train_x, train_y, val_x, val_y)
    assert separable["top1"] >= 95.0 and separable["top5"] >= separable["top1"] and separable["samples"] == 500
    shuffled = _probe(train_x, train_y[torch.randperm(1000, generator=generator)], val_x, val_y)
    assert abs(shuffled["top1"] - 10.0) < 6.0 and abs(shuffled["top5"] - 50.0) < 12.0


def _reference_top(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    hits = sum(
        int(label) in row.argsort(descending=True)[:k].tolist() for row, label in zip(logits, labels, strict=True)
    )
    return 100.0 * hits / len(labels)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_counts_top1_and_top5_like_the_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    features, labels = torch.randn(70, 32, generator=generator), torch.randint(0, 10, (70,), generator=generator)
    head = linear_head(32, 10, seed=3)
    scores = evaluate(nn.Identity(), head, [(features[:33], labels[:33]), (features[33:], labels[33:])], CPU)
    with torch.no_grad():
        logits = head(features)
    assert scores["top1"] == pytest.approx(_reference_top(logits, labels, 1))
    assert scores["top5"] == pytest.approx(_reference_top(logits, labels, 5))


def _sgd_reference(x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> nn.Linear:
    """Plain full-batch SGD with momentum and the cosine schedule, one process."""
    head = linear_head(32, 10)
    velocity = [torch.zeros_like(p) for p in head.parameters()]
    for step in range(steps):
        head.zero_grad()
        F.cross_entropy(head(x), y).backward()
        with torch.no_grad():
            step_lr = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)))
            for p, v in zip(head.parameters(), velocity, strict=True):
                v.mul_(0.9).add_(p.grad)
                p.sub_(step_lr * v)
    return head


def _two_rank_training(rank: int, world: int, x: torch.Tensor, y: torch.Tensor, expected: dict) -> None:
    half = slice(rank * 16, (rank + 1) * 16)  # each rank trains on its half of the same 32-row batch
    head = linear_head(32, 10)
    train_linear(nn.Identity(), head, itertools.repeat((x[half], y[half])), CPU, LinearSchedule(6, peak_lr=0.3))
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    scores = evaluate(nn.Identity(), head, [(x[half], y[half])], CPU)
    assert scores["samples"] == 32  # counts summed over the ranks


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_average_gradients_like_one_process_on_the_whole_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = _clusters(32, generator)
    expected = _sgd_reference(x, y, 6, 0.3).state_dict()
    single = linear_head(32, 10)
    train_linear(nn.Identity(), single, itertools.repeat((x, y)), CPU, LinearSchedule(6, peak_lr=0.3))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    run_ranks(_two_rank_training, 2, x, y, expected)


def _fake_run(tmp_path: Path, backbone: dict[str, torch.Tensor]) -> Path:
    """A run directory laid out like a moco_scale checkpoint: latest -> step folder -> DeepSpeed model file
    and rank 0's file (with the config)."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    module = {f"encoder_q.backbone.{k}": v for k, v in backbone.items()}
    module["encoder_q.head.0.weight"] = torch.zeros(3, 3)
    config = {"model": {"arch": "resnet18", "width": 1, "small_stem": True}, "data": {"image_size": 32}}
    torch.save({"module": module}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({"step": 2, "world_size": 1, "config": config}, ckpt / "rank_00000.pt")
    (ckpt.parent / "latest").write_text(ckpt.name)
    return tmp_path / "run"


def test_backbone_from_checkpoint_exported_file_and_fbmoco_layout(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = build_resnet("resnet18", small_stem=True).state_dict()
    run = _fake_run(tmp_path, state)
    torch.save(state, tmp_path / "backbone.pt")
    fbmoco = {f"module.encoder_q.{k}": v for k, v in state.items()}
    fbmoco["module.encoder_q.fc.0.weight"] = torch.zeros(3, 3)  # the projection head, as fb/moco names it
    torch.save({"state_dict": fbmoco, "arch": "resnet18"}, tmp_path / "moco.pth.tar")
    for source in (run, run / "checkpoints", run / "checkpoints" / "step_00000002", "backbone.pt", "moco.pth.tar"):
        weights, config = load_backbone(tmp_path / source)
        backbone = frozen_backbone(ModelConfig("resnet18", small_stem=True), 32, weights)
        assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items()), source
        assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
        assert config.get("model", {}).get("small_stem", True)
    with pytest.raises(WeightsError, match=r"do not fit resnet18 \(width 1, small_stem False\)"):
        frozen_backbone(ModelConfig("resnet18"), 32, weights)  # the small stem's conv1 is 3x3
    resolved = probe.resolve(None, {"probe.init": str(run)})
    model, size = resolved.cfg.model, resolved.cfg.data.image_size
    assert (model.arch, model.small_stem, size, resolved.run_dir) == ("resnet18", True, 32, run)  # the run's own
    resolved = probe.resolve(None, {"probe.init": str(run), "data.image_size": 24, "probe.run_dir": "elsewhere"})
    assert (resolved.cfg.data.image_size, resolved.run_dir) == (24, Path("elsewhere"))  # a flag wins over the run


def test_training_view_is_augmented_and_seeded(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["val"]))
    first = next(train_loader(linear_eval_stream(shards, 24, 16, rank=1, world_size=2, seed=4, shuffle_buffer=32)))
    again = next(train_loader(linear_eval_stream(shards, 24, 16, rank=1, world_size=2, seed=4, shuffle_buffer=32)))
    assert first[0].shape == (16, 3, 24, 24) and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    plain, _ = next(iter(eval_loader(shards, 24, 16, 0, 1)))
    assert -3 < first[0].mean() < 3 and not torch.equal(first[0], plain)


def _bad_inputs(tmp: Path, demo_train: Path) -> list[tuple[dict, str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    torch.save(build_resnet("resnet18").state_dict(), tmp / "r18.pt")
    return [
        ({"probe.init": str(tmp / "missing")}, r"'.*missing' does not exist"),
        ({"probe.init": str(tmp / "empty")}, r"'.*empty' holds no checkpoint"),
        ({"probe.init": str(tmp / "r18.pt"), "model.arch": "resnet50"}, r"the weights do not fit resnet50"),
        ({"probe.train_path": str(tmp / "nowhere")}, r"probe.train_path: '.*nowhere' does not exist"),
        ({"probe.train_path": str(tmp / "empty")}, r"probe.train_path: folder '.*empty' holds neither .tar shards"),
        ({"probe.train_path": str(tmp / "empty" / "*.tar")}, r"probe.train_path: no .tar shards match"),
        ({"probe.val_path": str(tmp / "nowhere")}, r"probe.val_path: '.*nowhere' does not exist"),
        ({"probe.train_path": str(demo_train)}, r"probe.val_path is needed"),
        ({"probe.num_classes": 5}, r"probe.num_classes=5 but the input has 10 classes"),
        ({"model.arch": "resnet5O"}, r"model.arch: unknown arch 'resnet5O'"),
        ({"probe.batch_size": 0}, r"probe.batch_size must be > 0, got 0"),
        ({"probe.schedule": "linear"}, r"probe.schedule: 'linear' is not one of cosine, step, constant"),
        ({"probe.epochs": 0}, r"probe.epochs must be >= 1"),
        ({"probe.frobnicate": 1}, r"probe.frobnicate"),
        ({"config": str(tmp / "none.yaml")}, r"config file '.*none.yaml' does not exist"),
    ]


def test_bad_input_is_rejected_before_any_compute(
    tmp_path: Path, capsys: pytest.CaptureFixture, demo_shards: dict[str, Path]
) -> None:
    for flags, message in _bad_inputs(tmp_path, demo_shards["train"]):
        arguments = {"config": str(DEMO), "probe.run_dir": str(tmp_path / "run"), "train.progress": False, **flags}
        with pytest.raises(SystemExit) as exit_info:
            probe.main(**arguments)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, flags
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert re.search(message, err), (message, err)
        assert not dist.is_initialized() and not (tmp_path / "run").exists()


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def test_bad_input_exits_without_traceback(tmp_path: Path) -> None:
    result = _run([sys.executable, str(LAUNCHER), f"--probe.init={tmp_path / 'missing'}"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_random_init_on_the_demo(tmp_path: Path) -> None:
    run_dir = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(LAUNCHER)]
    cmd += [f"--config={DEMO}", "--probe.init=random", "--probe.max_steps=6", "--train.progress=false"]
    cmd += [f"--probe.run_dir={run_dir}"]
    result = _run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("linear probe (resnet18, init random)")]
    assert len(lines) == 1, result.stdout
    record = json.loads((run_dir / "linear_probe.json").read_text())
    assert record["val_samples"] == 300 and record["world_size"] == 2 and record["steps"] == 6
    assert record["global_batch"] == 64 and record["peak_lr"] == pytest.approx(30.0 * 64 / 256)
    assert 0.0 <= record["top1"] <= record["top5"] <= 100.0 and record["num_classes"] == 10
