"""No checkpoint is lost, and no code runs from a file moco_scale reads.

Pruning never removes the new checkpoint; a fresh run over old checkpoints is refused; a roll-back sets
newer checkpoints aside; ``resume=auto`` with only damaged checkpoints names each; files are flushed
before they are published; a run_dir that the ranks do not share is reported at the first save. A rank
file that pickles ``os.system`` runs nothing in export, --inspect, the linear probe's --init and resume.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from test_checkpoint import _fake_checkpoint
from test_export import TAG, export, run_dir  # noqa: F401  (run_dir: the real 2-step checkpoint fixture)

from moco_scale import checkpoint, fileio, weights
from moco_scale.checkpoint import CheckpointError
from moco_scale.distributed.comm import shutdown_distributed
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.eval import probe

ROOT = Path(__file__).resolve().parent.parent
_TORCH_SAVE = torch.save


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _FakeEngine:
    """Writes files named as DeepSpeed's: a model file on rank 0 and an optimizer shard per rank."""

    reshardable = True
    model = torch.nn.Module()
    layout = DeepSpeedEngine.layout

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank()
        _TORCH_SAVE({"w": torch.ones(3)}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if rank == 0:
            _TORCH_SAVE({"module": {"w": torch.ones(3)}}, folder / "mp_rank_00_model_states.pt")


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A gloo process group of one, in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    shutdown_distributed()


def _save(run: Path, step: int, keep_last: int = 2, keep_every: int = 0) -> Path:
    return checkpoint.save(_FakeEngine(), run, step, {"batches": step}, {"train": {}}, keep_last, keep_every)


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoint_root(run).glob("step_*"))


def _latest(run: Path) -> str:
    return (checkpoint.checkpoint_root(run) / checkpoint.LATEST).read_text()


# ---------------------------------------------------------------- no checkpoint is lost


@pytest.mark.usefixtures("one_rank")
def test_pruning_keeps_the_new_checkpoint_and_newer_ones(tmp_path: Path) -> None:
    """In a run_dir that holds step_200 and step_300, saving step 150 with keep_last=2 used to delete step 150
    itself and leave ``latest`` naming nothing."""
    for tag in ("step_00000200", "step_00000300"):
        _fake_checkpoint(tmp_path, tag, 1)
    _save(tmp_path, 150)
    assert _latest(tmp_path) == "step_00000150"
    assert _tags(tmp_path) == ["step_00000150", "step_00000200", "step_00000300"]
    checkpoint.check_loadable(checkpoint.checkpoint_root(tmp_path) / "step_00000150")
    _save(tmp_path, 160)
    _save(tmp_path, 170)  # keep_last=2: 160 and 170 of what is older than 170; never the newer ones
    assert _tags(tmp_path) == ["step_00000160", "step_00000170", "step_00000200", "step_00000300"]
    _save(tmp_path, 180, keep_last=1, keep_every=20)  # keep_every still honoured: 160 stays, 170 goes
    assert _tags(tmp_path) == ["step_00000160", "step_00000180", "step_00000200", "step_00000300"]
    assert _latest(tmp_path) == "step_00000180"


def test_fresh_start_over_checkpoints_is_a_one_line_error(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, "step_00000200", 2)
    _fake_checkpoint(tmp_path, "step_00000300", 2)
    with pytest.raises(CheckpointError) as info:
        checkpoint.find_resume("", tmp_path, 2)
    message = str(info.value)
    assert "\n" not in message and "step_00000300" in message and "--checkpoint.resume=auto" in message
    assert "train.run_dir" in message
    other = _fake_checkpoint(tmp_path / "other", "step_00000100", 2)  # another run's checkpoint, resumed here
    with pytest.raises(CheckpointError, match="already holds checkpoints .newest step_00000300.*another train.run_dir"):
        checkpoint.find_resume(str(other), tmp_path, 2)
    assert _tags(tmp_path) == ["step_00000200", "step_00000300"]  # nothing touched
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert checkpoint.find_resume("", tmp_path / "empty", 2) is None  # an empty checkpoints folder: fresh
    assert checkpoint.find_resume("auto", tmp_path / "empty", 2) is None


@pytest.mark.usefixtures("one_rank")
def test_rolling_back_sets_newer_checkpoints_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--checkpoint.resume=<run>/checkpoints/step_200 in a run_dir that holds step_300: step_300 moves to
    checkpoints/set_aside/, latest names step_200, and the run's next save keeps its checkpoint."""
    older = _fake_checkpoint(tmp_path, "step_00000200", 1)
    _fake_checkpoint(tmp_path, "step_00000300", 1)
    resume_from = checkpoint.find_resume(str(older), tmp_path, 1)
    assert resume_from == older
    dest = checkpoint.set_aside_newer(resume_from, tmp_path)
    assert dest is not None and dest.parent == checkpoint.checkpoint_root(tmp_path) / checkpoint.SET_ASIDE
    assert dest.name.startswith("step_00000200-") and (dest / "step_00000300" / "rank_00000.pt").is_file()
    assert "moved the newer checkpoints (step_00000300)" in capsys.readouterr().err
    assert _tags(tmp_path) == ["step_00000200"] and _latest(tmp_path) == "step_00000200"
    assert checkpoint.set_aside_newer(resume_from, tmp_path) is None  # again: nothing left to move
    _save(tmp_path, 250, keep_last=1)
    assert _tags(tmp_path) == ["step_00000250"] and _latest(tmp_path) == "step_00000250"
    assert checkpoint.find_resume("auto", tmp_path, 1).name == "step_00000250"


def test_set_aside_is_left_to_rank_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older = _fake_checkpoint(tmp_path, "step_00000200", 1)
    _fake_checkpoint(tmp_path, "step_00000300", 1)
    monkeypatch.setenv("RANK", "1")
    assert checkpoint.set_aside_newer(older, tmp_path) is None
    assert _tags(tmp_path) == ["step_00000200", "step_00000300"] and _latest(tmp_path) == "step_00000300"


def test_auto_with_only_damaged_checkpoints_names_each(tmp_path: Path) -> None:
    newer = _fake_checkpoint(tmp_path, "step_00000300", 2)
    (newer / "rank_00001.pt").unlink()
    older = _fake_checkpoint(tmp_path, "step_00000200", 2)
    (checkpoint.checkpoint_root(tmp_path) / checkpoint.LATEST).write_text(newer.name)
    rank_file = older / "rank_00001.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:50])
    with pytest.raises(CheckpointError) as info:
        checkpoint.find_resume("auto", tmp_path, 2)
    message = str(info.value)
    assert "\n" not in message and "holds no loadable checkpoint" in message
    assert "step_00000300: missing rank_00001.pt" in message
    assert "step_00000200/rank_00001.pt is truncated or unreadable" in message


@pytest.mark.usefixtures("one_rank")
def test_files_are_flushed_before_the_rename_that_publishes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path.resolve()
    root = checkpoint.checkpoint_root(run)
    _save(run, 10)
    partial, final = root / "step_00000010.partial", root / "step_00000010"
    publish = events.index(("replace", str(partial), str(final)))
    flushed = {path for kind, path, *_ in events[:publish] if kind == "fsync"}
    files = ["rank_00000.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert {str(partial / name) for name in files} | {str(partial)} <= flushed
    assert sorted(p.name for p in final.iterdir()) == sorted(files)
    after = events[publish + 1 :]
    assert after[0] == ("fsync", str(root))  # the rename itself
    temp = next(e[1] for e in after if e[0] == "replace")  # latest: a flushed temp file, replaced, folder flushed
    assert after[1:] == [("fsync", temp), ("replace", temp, str(root / "latest")), ("fsync", str(root))]
    assert _latest(tmp_path) == "step_00000010"


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    fileio.write_atomically(target, "step_00000001")
    with pytest.raises(ZeroDivisionError), fileio.replacing(target) as temp:
        temp.write_text("step_000")
        raise ZeroDivisionError
    assert target.read_text() == "step_00000001" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def _unshared_run_dir(rank: int, world_size: int, run: str) -> None:
    """Rank 0 cannot see rank 1's file (deleted between the write and the publish): both ranks raise the
    same one-line error and nothing is published. Then a write that fails on rank 1 ends both ranks too."""
    checkpoint.VISIBILITY_WAIT_S = 0.3
    root = checkpoint.checkpoint_root(run)
    if rank == 0:
        publish = checkpoint._publish

        def unshared(partial: Path, final: Path, world: int) -> None:
            (partial / "rank_00001.pt").unlink()
            publish(partial, final, world)

        checkpoint._publish = unshared
    with pytest.raises(CheckpointError) as info:
        _save(Path(run), 4)
    message = str(info.value)
    assert "\n" not in message and message.startswith("rank 0 cannot see rank_00001.pt"), message
    assert message.endswith("train.run_dir must be on a file system all ranks share"), message
    assert not (root / "step_00000004").exists() and not (root / checkpoint.LATEST).exists()
    if rank == 0:
        checkpoint._publish = publish
    if rank == 1:

        def disk_full(path: Path) -> None:
            raise OSError(28, "No space left on device")

        checkpoint.fsync_file = disk_full
    with pytest.raises(CheckpointError, match=r"^rank 1 could not write its part of .*No space left on device$"):
        _save(Path(run), 5)
    assert not (root / "step_00000005").exists() and not (root / checkpoint.LATEST).exists()


def test_a_run_dir_the_ranks_do_not_share_is_reported_on_every_rank(tmp_path: Path) -> None:
    run_ranks(_unshared_run_dir, 2, str(tmp_path / "run"))


def test_export_writes_no_partial_file_when_saving_fails(
    run_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "backbone.pt"
    out.write_bytes(b"the previous export")

    def half_then_fail(obj: object, file: str | Path) -> None:
        Path(file).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export.export(run_dir / "checkpoints" / TAG, out, "torchvision")
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["backbone.pt"]
    monkeypatch.undo()
    assert export.main([str(run_dir), str(out)]) == 0
    assert torch.load(out, weights_only=True).keys() == weights.load_backbone(run_dir)[0].keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.md", "backbone.pt"]  # with its model card


# ---------------------------------------------------------------- nothing runs code from a file it reads


def test_rank_files_hold_only_tensors_and_plain_values(run_dir: Path) -> None:  # noqa: F811
    meta = torch.load(run_dir / "checkpoints" / TAG / "rank_00000.pt", weights_only=True)
    assert meta["step"] == 2 and isinstance(meta["rng"]["numpy"], dict)


def test_rng_state_round_trips_exactly_through_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal(3)  # an odd count: numpy caches the second gaussian of a pair
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.standard_normal(4), np.random.randint(0, 1 << 30, 4), torch.rand(4))
    _TORCH_SAVE(checkpoint._plain({"rng": state}), tmp_path / "rank.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rank.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(4), np.random.randint(0, 1 << 30, 4), torch.rand(4))
    assert got[0] == expected[0] and torch.equal(got[3], expected[3])
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    _TORCH_SAVE({"world_size": 1, "rng": legacy}, tmp_path / "old.pt")  # rank files written before this change
    expected_old = np.random.random(3)
    checkpoint.set_rng_state(checkpoint._load_plain(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.random(3), expected_old)


def test_plain_converts_numpy_and_refuses_objects() -> None:
    plain = checkpoint._plain({"a": np.int64(3), "b": (np.float32(0.5), [np.arange(2)])})
    assert plain["a"] == 3 and type(plain["a"]) is int and type(plain["b"][0]) is float
    assert torch.equal(plain["b"][1][0], torch.arange(2))
    with pytest.raises(TypeError, match=r"checkpoint value \.loader\.x is a set"):
        checkpoint._plain({"loader": {"x": {1, 2}}})


def _planted(source: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the real checkpoint whose rank_00000.pt runs ``touch MARKER`` when fully unpickled."""
    run = tmp_path / "planted"
    ckpt = checkpoint.checkpoint_root(run) / TAG
    shutil.copytree(source / "checkpoints" / TAG, ckpt)
    (ckpt.parent / checkpoint.LATEST).write_text(TAG)
    marker = tmp_path / "MARKER"
    meta = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    _TORCH_SAVE({**meta, "loader": _RunsCode(marker)}, ckpt / "rank_00000.pt")
    torch.load(ckpt / "rank_00000.pt", weights_only=False)  # the exploit is live: a full unpickle runs it
    assert marker.exists()
    marker.unlink()
    return run, ckpt, marker


REFUSED = "rank_00000.pt holds posix.system, not only tensors and plain values; refused (no code from it was run)"


def test_a_planted_rank_file_runs_nothing_in_export_inspect_probe_and_resume(
    run_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run, ckpt, marker = _planted(run_dir, tmp_path)
    out = tmp_path / "out.pt"
    for argv in (["--inspect", str(run)], [str(ckpt), str(out)], [str(run), str(out), "--layout", "fbmoco"]):
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and err.rstrip().endswith(REFUSED), err
        assert not marker.exists() and not out.exists(), argv
    with pytest.raises(CheckpointError, match=re.escape(REFUSED)):  # what the linear probe's --init calls
        weights.load_backbone(run)
    with pytest.raises(SystemExit) as exit_info:
        probe.main(
            config=str(ROOT / "configs" / "demo.yaml"), **{"probe.init": str(ckpt), "probe.run_dir": str(tmp_path)}
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.rstrip().endswith(REFUSED), err
    for resume in (str(ckpt), str(run)):
        with pytest.raises(CheckpointError, match=re.escape(REFUSED)):
            checkpoint.find_resume(resume, run, 1)
    with pytest.raises(CheckpointError, match="holds no loadable checkpoint: " + re.escape(f"{TAG}/{REFUSED}")):
        checkpoint.find_resume("auto", run, 1)
    with pytest.raises(CheckpointError, match=re.escape(REFUSED)):
        checkpoint.read_meta(ckpt)
    assert not marker.exists()


def test_resume_from_a_planted_rank_file_runs_nothing_in_the_launcher(
    run_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    run, _, marker = _planted(run_dir, tmp_path)
    cmd = [sys.executable, "launchers/pretrain.py", "--config", "configs/demo.yaml", "--train.max_steps=2"]
    cmd += ["--train.progress=false", "--eval.every_steps=0", f"--train.run_dir={run}", "--checkpoint.resume=auto"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and REFUSED in result.stderr.strip().splitlines()[-1]
    assert not marker.exists()
