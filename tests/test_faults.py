"""What a cluster does to a job: a signal to every process of it (during training, a save, a kNN evaluation),
a rank killed, a rank hung. Real 2-rank jobs under moco_scale.launch (and the deepspeed launcher)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moco_scale import checkpoint
from moco_scale.data.dali import dali_available
from moco_scale.distributed.comm import free_port

ROOT = Path(__file__).resolve().parent.parent


def _pretrain_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--engine.precision=fp32",
        "--train.log_every=1",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
        *extra,
    ]


def _start(command: list[str]) -> subprocess.Popen:
    """The job in a process group of its own, as SLURM's step is."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    return _start([sys.executable, "-m", "moco_scale.launch", "--nproc", "2", *_pretrain_args(run_dir, *extra)])


def _records(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.02) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The job's ranks, in rank order (loader workers are forks of a rank, with its command line)."""
    ranks = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RANK" in p.environ() and "launchers/pretrain.py" in p.cmdline() and p.parent().cmdline() != p.cmdline():
                ranks.append(p)
        except (psutil.Error, ProcessLookupError):  # a short-lived child, gone already
            continue
    return sorted(ranks, key=lambda p: int(p.environ()["RANK"]))


def _catches(rank: psutil.Process, sig: signal.Signals) -> bool:
    """Whether ``rank`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{rank.pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (sig - 1) & 1)


CASES = [  # (when the signal comes, engine, loader, signal)
    ("startup", "zero0", "torch", signal.SIGUSR1),
    ("training", "zero0", "torch", signal.SIGUSR1),
    ("save", "zero3", "dali", signal.SIGTERM),
    ("knn", "fsdp", "torch", signal.SIGUSR1),
    ("training", "fsdp", "dali", signal.SIGTERM),
]


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "engine", "loader", "sig"), CASES, ids=lambda v: getattr(v, "name", v))
def test_a_signal_to_the_whole_job_ends_in_a_checkpoint(
    tmp_path: Path, phase: str, engine: str, loader: str, sig: signal.Signals
) -> None:
    """``kill -SIG -- -PGID``: the launcher, every rank and every loader worker get it; the job saves and exits 0."""
    if loader == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    run_dir = tmp_path / "run"
    engine_args = ["--engine.backend=fsdp"] if engine == "fsdp" else [f"--engine.zero_stage={engine[-1]}"]
    proc = _launch(
        run_dir,
        *engine_args,
        f"--data.backend={loader}",
        "--data.workers=2",
        "--train.max_steps=40",
        f"--checkpoint.every_steps={3 if phase == 'save' else 0}",
        f"--eval.every_steps={4 if phase == 'knn' else 0}",
    )
    root = checkpoint.checkpoint_root(run_dir)
    if phase == "startup":  # the ranks have just started importing torch (seconds): only the stop handler is in
        _wait_for(lambda: len(_ranks(proc)) == 2 and all(_catches(p, sig) for p in _ranks(proc)), proc, poll=0.002)
        loaded = [Path(f"/proc/{p.pid}/maps").read_text() for p in _ranks(proc)]
        assert not any("libtorch" in maps for maps in loaded), "the handler should be in before torch is imported"
    elif phase == "save":  # while the ranks write step 3 or 6
        _wait_for(lambda: any(root.glob("step_*.partial")), proc, poll=0.002)
    elif phase == "knn":  # step 4 trains (a fraction of a second), then the kNN pass over 1,797 images starts
        _wait_for(lambda: _records(run_dir) >= 4, proc)  # the step-0 kNN record and steps 1-3
        time.sleep(0.8)
    else:
        _wait_for(lambda: _records(run_dir) >= 3, proc)
    workers = [p for rank in _ranks(proc) for p in rank.children()]
    assert loader == "dali" or phase == "startup" or len(workers) >= 4, "the torch loader's workers should be running"
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal after step" in out and "Traceback" not in out, out[-4000:]
    latest = checkpoint.locate(run_dir)
    checkpoint.check_loadable(latest)
    assert not list(root.glob("*.partial"))
    stopped_at = int(out.split("stopped by signal after step ")[1].split(";")[0])
    assert latest.name == f"step_{stopped_at:08d}"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["moco_scale.launch", "deepspeed"])
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(tmp_path: Path, launcher: str) -> None:
    """SIGKILL to rank 1 mid-run (an OOM kill, a lost node): the job ends within seconds, not after the
    collective timeout, names the rank where the launcher can, and resume=auto continues from the last save."""
    run_dir = tmp_path / "run"
    args = _pretrain_args(run_dir, "--train.max_steps=8", "--checkpoint.every_steps=2", "--eval.every_steps=0")
    if launcher == "deepspeed":
        proc = _start(
            [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args]
        )
    else:
        proc = _start([sys.executable, "-m", "moco_scale.launch", "--nproc", "2", *args])
    _wait_for(lambda: _records(run_dir) >= 5, proc)
    killed = time.time()
    _ranks(proc)[1].kill()
    out, _ = proc.communicate(timeout=300)
    ended_after = time.time() - killed
    assert proc.returncode != 0
    assert ended_after < 60, ended_after  # engine.timeout_s is 600
    if launcher == "moco_scale.launch":
        assert "error: rank 1 was killed by SIGKILL; ending the job" in out, out[-3000:]
    resumed = subprocess.run(
        [sys.executable, *args, "--checkpoint.resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: 8 steps" in resumed.stdout


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_engine_timeout(tmp_path: Path) -> None:
    """SIGSTOP to rank 1 (a hung node): rank 0's next collective gives up after engine.timeout_s, says so in
    one line, and the launcher ends the job."""
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--train.max_steps=40", "--engine.timeout_s=10", "--eval.every_steps=0")
    _wait_for(lambda: _records(run_dir) >= 3, proc)
    stopped = time.time()
    _ranks(proc)[1].suspend()
    out, _ = proc.communicate(timeout=300)
    ended_after = time.time() - stopped
    assert proc.returncode == 1
    assert 9 < ended_after < 60, ended_after
    assert "error: rank 0: a collective failed, so another rank died or hangs" in out, out[-3000:]
    assert "error: rank 0 exited with code 1; ending the job" in out
