"""Checkpoints: resolution and damage checks, and a SIGTERM-interrupted 2-rank run that resumes bitwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from moco_scale import checkpoint
from moco_scale.distributed.comm import free_port
from moco_scale.engine.fsdp import FSDPEngine

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """A launcher command from the repository root, its output captured; it must succeed."""
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _fake_checkpoint(run_dir: Path, tag: str, world_size: int, zero: int = 0) -> Path:
    path = checkpoint.checkpoint_root(run_dir) / tag
    path.mkdir(parents=True)
    meta = {"world_size": world_size, "reshardable": zero != 3, "config": {"engine": {"zero_stage": zero}}}
    torch.save({"module": {}}, path / "mp_rank_00_model_states.pt")  # named as DeepSpeed's
    for rank in range(world_size):
        torch.save(meta, path / f"rank_{rank:05d}.pt")
        if zero:
            torch.save({}, path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (checkpoint.checkpoint_root(run_dir) / checkpoint.LATEST).write_text(tag)
    return path


def test_resume_resolution(tmp_path: Path) -> None:
    assert checkpoint.find_resume("", tmp_path, 2) is None
    assert checkpoint.find_resume("auto", tmp_path, 2) is None  # nothing yet: start fresh
    path = _fake_checkpoint(tmp_path, "step_00000007", 2)
    (checkpoint.checkpoint_root(tmp_path) / "step_00000009.partial").mkdir()  # a save killed midway
    assert checkpoint.find_resume("auto", tmp_path, 2) == path
    assert checkpoint.find_resume(str(tmp_path), "elsewhere", 2) == path  # a run directory
    assert checkpoint.find_resume(str(checkpoint.checkpoint_root(tmp_path)), "elsewhere", 2) == path
    assert checkpoint.find_resume(str(path), "elsewhere", 3) == path  # another world size: re-cut on load
    with pytest.raises(checkpoint.CheckpointError, match="nope' does not exist"):
        checkpoint.find_resume(str(tmp_path / "nope"), tmp_path, 2)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint folder"):
        checkpoint.find_resume(str(tmp_path / "file.txt"), tmp_path, 2)


def test_fixed_world_size_checkpoints_are_refused_on_another(tmp_path: Path) -> None:
    """ZeRO-3 partitions (and sharded queues) are not re-cut: a one-line error before any compute."""
    path = _fake_checkpoint(tmp_path, "step_00000007", 2, zero=3)
    assert checkpoint.find_resume("auto", tmp_path, 2) == path
    message = "ZeRO-3 checkpoints resume on the world size that wrote them [(]2 ranks[)], not 1$"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.find_resume("auto", tmp_path, 1)


def test_auto_falls_back_past_damaged_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    older = _fake_checkpoint(tmp_path, "step_00000004", 2, zero=2)
    newer = _fake_checkpoint(tmp_path, "step_00000008", 2, zero=2)
    rank_file = newer / "rank_00001.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:50])  # truncated
    assert checkpoint.find_resume("auto", tmp_path, 2) == older
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match="rank_00001.pt is truncated or unreadable"):
        checkpoint.find_resume(str(newer), tmp_path, 2)  # asked for by name: no silent fallback


def test_damaged_checkpoints_get_one_line_errors(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path, "step_00000003", 2)
    checkpoint.check_loadable(path)
    (path / "rank_00001.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing rank_00001.pt$"):
        checkpoint.check_loadable(path)
    sharded = _fake_checkpoint(tmp_path / "z2", "step_00000003", 2, zero=2)
    checkpoint.check_loadable(sharded)
    (sharded / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        checkpoint.check_loadable(sharded)
    torch.save({}, sharded / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (sharded / "mp_rank_00_model_states.pt").write_bytes(b"PK")  # cut short
    with pytest.raises(checkpoint.CheckpointError, match="mp_rank_00_model_states.pt is truncated or unreadable"):
        checkpoint.check_loadable(sharded)
    (sharded / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing mp_rank_00_model_states.pt"):
        checkpoint.check_loadable(sharded)
    engine_less = _fake_checkpoint(tmp_path / "bare", "step_00000003", 1)
    (engine_less / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint .no DeepSpeed's .*, no torch"):
        checkpoint.check_loadable(engine_less)  # no backend's files at all
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no rank_"):
        checkpoint.check_loadable(empty)


ALLOW_LONGER = "--checkpoint.allow_changes=train.max_steps"  # a longer run: its lr schedule differs from here on


def _launch(run_dir: Path, zero: int, *extra: str, steps: int = 10, every: int = 5) -> subprocess.Popen:
    cmd = [
        shutil.which("deepspeed") or "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),  # not DeepSpeed's fixed default, which other jobs on the box may hold
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--engine.precision=fp32",
        f"--engine.zero_stage={zero}",
        f"--train.max_steps={steps}",
        "--train.log_every=1",
        f"--checkpoint.every_steps={every}",
        "--checkpoint.keep_last=1",
        "--checkpoint.keep_every=5",
        "--train.progress=false",
        "--eval.every_steps=0",
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
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The module (both encoders, queue, BN buffers) and optimizer state of the step-10 checkpoint, all shards."""
    final = checkpoint.checkpoint_root(run_dir) / "step_00000010"
    state = {}
    for file in sorted(final.glob("*.pt")):
        if file.name.startswith("rank_"):
            continue
        content = torch.load(file, weights_only=False)
        for key, value in _tensors(content, file.name):
            state[key] = value
    return state


def _tensors(tree: object, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _tensors(v, f"{prefix}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [kv for i, v in enumerate(tree) for kv in _tensors(v, f"{prefix}.{i}")]
    return []


def _interrupt(run_dir: Path, zero: int, sig: signal.Signals, after_step: int) -> subprocess.Popen:
    proc = _launch(run_dir, zero)
    deadline = time.time() + 500
    while _logged_steps(run_dir) < after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    ranks = [  # torch DataLoader workers are forks of a rank, with its command line
        p for p in children if any(a.startswith("--local_rank") for a in p.cmdline()) and p.name() != "pt_data_worker"
    ]
    assert len(ranks) == 2
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies at once, as on a node failure
    else:
        for rank in ranks:
            rank.send_signal(sig)  # what SLURM does on preemption: every task gets it
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "zero"), [(signal.SIGTERM, 0), (signal.SIGKILL, 2), (signal.SIGTERM, 3)])
def test_interrupted_run_resumes_bitwise(tmp_path: Path, sig: signal.Signals, zero: int) -> None:
    """Interrupted mid-epoch (the demo's epoch is 23 steps) and resumed with resume=auto, the run ends
    bitwise equal to the same run left alone: parameters, key encoder, queue, BN buffers, optimizer."""
    _finish(_launch(tmp_path / "straight", zero))
    interrupted = tmp_path / "interrupted"
    proc = _interrupt(interrupted, zero, sig, after_step=7 if sig == signal.SIGKILL else 3)
    out, _ = proc.communicate(timeout=600)
    latest = (checkpoint.checkpoint_root(interrupted) / checkpoint.LATEST).read_text()
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "stopped by signal after step" in out, out[-3000:]
        assert 3 <= int(latest.split("_")[1]) < 10, latest
    else:
        assert proc.returncode != 0
        assert latest == "step_00000005"  # at most one checkpoint interval lost
    out = _finish(_launch(interrupted, zero, "--checkpoint.resume=auto"))
    assert "done: 10 steps" in out
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(interrupted)
    assert straight.keys() == resumed.keys()
    assert any("queue.keys" in k for k in straight) and any("encoder_k" in k for k in straight)
    assert any("optim" in k for k in straight)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    kept = sorted(p.name for p in checkpoint.checkpoint_root(interrupted).glob("step_*"))
    assert kept == ["step_00000005", "step_00000010"]  # keep_last=1 plus keep_every=5; nothing .partial left


def _saved_momentum(ckpt: Path, zero: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's SGD momentum as saved: whole in the model file under ZeRO 0; under ZeRO 1/2 the
    concatenation of the ranks' flat shards, cut into the parameters in order (plain reference)."""
    if zero == 0:
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]
        return [state[i]["momentum_buffer"] for i in range(len(params))]
    shards = [
        torch.load(file, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
        for file in sorted(ckpt.glob("zero_pp_rank_*_optim_states.pt"))
    ]
    flat = torch.cat([shard["momentum_buffer"] for shard in shards])
    sizes = [p.numel() for p in params]
    return [piece.view_as(p) for piece, p in zip(flat[: sum(sizes)].split(sizes), params, strict=True)]


def _restore_and_compare(rank: int, world: int, ckpt: str, config: str, zero: int) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from moco_scale.config import load_config
    from moco_scale.data.loader import remap_state
    from moco_scale.distributed.comm import init_distributed
    from moco_scale.train import build_engine

    cfg = load_config(config, {"engine.precision": "fp32", "engine.zero_stage": zero})
    model, engine = build_engine(cfg, init_distributed("cpu"), peak_lr=0.1)
    fresh_queue = model.queue.keys.clone()
    step, loader_state, saved_world = checkpoint.load(engine, Path(ckpt))
    saved = torch.load(Path(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)
    restored = model.state_dict()
    assert restored.keys() == saved["module"].keys()
    for name, value in saved["module"].items():  # queue, key encoder, BN statistics included
        assert torch.equal(restored[name], value), name
    assert not torch.equal(model.queue.keys, fresh_queue)  # restored, not re-initialised
    params = [p for p in model.parameters() if p.requires_grad]
    for p, expected in zip(params, _saved_momentum(Path(ckpt), zero, params), strict=True):
        if zero:  # gathered from this world size's shards, and the fp32 master matches the module
            assert torch.equal(safe_get_full_fp32_param(p), p.detach())
            assert torch.equal(safe_get_full_optimizer_state(p, "momentum_buffer"), expected)
        else:
            assert torch.equal(engine.optimizer.state[p]["momentum_buffer"], expected)
    assert (step, saved_world) == (4, 2)
    remapped = remap_state(loader_state, saved_world, world)  # the global sample count carries over
    assert remapped == {k: loader_state[k] for k in ("samples", "epoch_samples", "bad_samples")}
    assert remapped["samples"] == 4 * 32 * 2


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_world_size_change_restores_everything(tmp_path: Path, zero: int) -> None:
    """A checkpoint of 2 ranks resumes on 1 and on 3 ranks with the same queue, key encoder, BN buffers
    and optimizer state (under ZeRO 2 re-cut from the 2 saved shards), and training goes on."""
    run_dir = tmp_path / "run"
    _finish(_launch(run_dir, zero, steps=4, every=4))
    ckpt = checkpoint.checkpoint_root(run_dir) / "step_00000004"
    from dist_utils import run_ranks

    for world in (1, 3):
        run_ranks(_restore_and_compare, world, str(ckpt), str(ROOT / "configs" / "demo.yaml"), zero)
    resumed = _run(
        [
            sys.executable,
            "launchers/pretrain.py",
            "--config",
            "configs/demo.yaml",
            "--engine.precision=fp32",
            f"--engine.zero_stage={zero}",
            "--train.max_steps=6",
            "--train.log_every=1",
            "--train.progress=false",
            "--eval.every_steps=0",
            "--checkpoint.resume=auto",
            ALLOW_LONGER,
            f"--train.run_dir={run_dir}",
        ],
    )
    assert "done: 6 steps" in resumed.stdout


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, 0)  # checkpoints at steps 5 and 10
    partial = checkpoint.checkpoint_root(run_dir) / "step_00000010.partial"
    deadline = time.time() + 500
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "never saw the save of step 10 in progress"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies while it writes step 10
    proc.communicate(timeout=120)
    root = checkpoint.checkpoint_root(run_dir)
    if (root / checkpoint.LATEST).read_text() == "step_00000010":
        pytest.skip("the save finished between seeing it and the kill; nothing to check this time")
    assert (root / checkpoint.LATEST).read_text() == "step_00000005"
    out = _finish(_launch(run_dir, 0, "--checkpoint.resume=auto"))
    assert "done: 10 steps" in out and not partial.exists()


def _fsdp_restore_and_compare(rank: int, world: int, ckpt: str, config: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    from torch.distributed.tensor import DTensor

    from moco_scale.config import load_config
    from moco_scale.distributed.comm import init_distributed
    from moco_scale.train import build_engine
    from moco_scale.weights import read_module

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    cfg = load_config(config, {"engine.precision": "fp32", "engine.backend": "fsdp"})
    model, engine = build_engine(cfg, init_distributed("cpu"), peak_lr=0.1)
    fresh_queue = model.queue.keys.clone()
    step, _, saved_world = checkpoint.load(engine, Path(ckpt))
    assert (step, saved_world) == (4, 2)
    saved_module = read_module(Path(ckpt))  # the saved shards put together, read without a process group
    model_state, optimizer_state = get_state_dict(model, engine.optimizer)
    assert model_state.keys() == saved_module.keys()
    for name, value in saved_module.items():  # queue, key encoder, BN statistics included
        assert torch.equal(whole(model_state[name]), value), name
    assert not torch.equal(model.queue.keys, fresh_queue)  # restored, not re-initialised
    saved_optimizer = _load_state_dict_from_keys({"optimizer"}, checkpoint_id=ckpt)["optimizer"]["state"]
    assert optimizer_state["state"].keys() == saved_optimizer.keys() and saved_optimizer
    for name, state in saved_optimizer.items():
        assert torch.equal(whole(optimizer_state["state"][name]["momentum_buffer"]), state["momentum_buffer"]), name


@pytest.mark.slow
def test_fsdp_checkpoint_is_recut_for_another_world_size(tmp_path: Path) -> None:
    """FSDP2 under torchrun: a checkpoint of 2 ranks (torch.distributed.checkpoint) resumes on 1 and on 3
    ranks with the same module (key encoder, queue, BN buffers) and SGD momentum, and training goes on."""
    run_dir = tmp_path / "run"
    common = [
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--engine.precision=fp32",
        "--engine.backend=fsdp",
        "--train.log_every=1",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    first_run = [*torchrun, str(free_port()), *common, "--train.max_steps=4", "--checkpoint.every_steps=4"]
    _run([*first_run, "--eval.every_steps=4"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = {r["step"]: r["knn_top1"] for r in records if "knn_top1" in r}
    assert sorted(knn) == [0, 4] and all(v > 0 for v in knn.values())  # evaluated on a gathered copy
    ckpt = checkpoint.checkpoint_root(run_dir) / "step_00000004"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    layout = FSDPEngine.layout  # the files it names are those the engine wrote, each with its writer
    engine_files = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("rank_"))
    assert engine_files == sorted(f.name for f in layout.expected_files(ckpt, 2))
    assert [layout.writer(name) for name in engine_files] == [0, 0, 1]  # .metadata, __0_0.distcp, __1_0.distcp
    assert checkpoint.engine_layout(ckpt) is layout
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    checkpoint.check_loadable(damaged)
    os.truncate(damaged / "__1_0.distcp", (damaged / "__1_0.distcp").stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match="__1_0.distcp is truncated or missing$"):
        checkpoint.check_loadable(damaged)
    from dist_utils import run_ranks

    for world in (1, 3):
        run_ranks(_fsdp_restore_and_compare, world, str(ckpt), str(ROOT / "configs" / "demo.yaml"))
    resumed = _run([sys.executable, *common, "--train.max_steps=6", "--checkpoint.resume=auto", ALLOW_LONGER])
    assert "done: 6 steps" in resumed.stdout
