"""A chaos run of the demo on 2 CPU ranks: what a long cluster job meets, each followed by ``resume=auto``.

    python benchmarks/faults.py --json runs/faults.json            # 10 kills, 5 group signals, the rest
    python benchmarks/faults.py --smoke --json /tmp/faults.json    # 1 of each (CI)

1. An uninterrupted reference run (fp32) keeps every checkpoint.
2. The same run is started again and again under ``moco_scale.launch``; each time one fault strikes at a
   random step: SIGKILL to the whole job (some while a checkpoint is being written), SIGUSR1 to the whole
   process group, or SIGKILL to one rank. Every checkpoint the interrupted run leaves is compared bitwise
   (module, optimizer, loader position and RNG states) with the reference's at the same step.
3. A NaN injected into one rank's views at one step: the step is skipped, the run goes on, nothing
   non-finite is saved.
4. Bad inputs: a truncated ``manifest.json``, a shard rewritten after indexing (one-line errors before any
   compute), and a shard of fuzzed images in five formats (skipped and counted by the torch loader).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from _common import environment, format_table, write_json
from PIL import Image

from moco_scale import checkpoint
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.shards import write_shards

ROOT = Path(__file__).resolve().parent.parent
INJECT = Path(__file__).resolve().parent / "_inject_nan.py"
PRETRAIN = ROOT / "launchers" / "pretrain.py"


def job(run_dir: Path, steps: int, every: int, *extra: str, script: Path = PRETRAIN, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moco_scale.launch",
        "--nproc",
        str(nproc),
        str(script),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--engine.precision=fp32",
        f"--train.max_steps={steps}",
        f"--checkpoint.every_steps={every}",
        "--eval.every_steps=0",
        "--train.log_every=1",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
        *extra,
    ]


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """In a process group of its own, as a SLURM step is."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        start_new_session=True,
    )


def metrics_size(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.stat().st_size if metrics.exists() else 0


def last_step(run_dir: Path, since: int = 0) -> int:
    """The step of the last record in metrics.jsonl written after its first ``since`` bytes; 0 without one.
    (A resumed job appends to the file: the records of the job it replaced are no news of this one.)"""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    with metrics.open("rb") as f:
        f.seek(since)
        lines = f.read().decode().splitlines()
    complete = [line for line in lines if line.endswith("}")]
    return json.loads(complete[-1])["step"] if complete else 0


def latest_step(run_dir: Path) -> int:
    """The step of the checkpoint ``latest`` names; 0 without one."""
    pointer = checkpoint.checkpoint_root(run_dir) / checkpoint.LATEST
    return int(pointer.read_text().split("_")[1]) if pointer.is_file() else 0


def contents(ckpt: Path) -> dict[str, Any]:
    """Every tensor and plain value of a checkpoint's files, by file and key path (rank files included)."""
    flat: dict[str, Any] = {}

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}")
        elif isinstance(tree, (list, tuple)):
            for i, value in enumerate(tree):
                walk(value, f"{prefix}.{i}")
        else:
            flat[prefix] = tree

    for file in sorted(ckpt.glob("*.pt")):
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        walk(loaded, file.name)
    # What may differ between the runs: where they write and how they were asked to resume and prune.
    return {k: v for k, v in flat.items() if not any(part in k for part in ("ds_config", "ds_version", ".config."))}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ (or that only one side has)."""
    differ = sorted(a.keys() ^ b.keys())
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            differ.append(key)
    return differ


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    """Rank ``rank`` of the job, or None once it is gone."""
    try:
        for child in psutil.Process(proc.pid).children():
            if child.environ().get("RANK") == str(rank):
                return child
    except (psutil.Error, ProcessLookupError):  # the job, or a short-lived child, is gone
        pass
    return None


def wait_until(condition, proc: subprocess.Popen, poll: float = 0.01) -> bool:
    """True once ``condition()`` holds; False if the job ended first."""
    while not condition():
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return True


def chaos(work: Path, steps: int, every: int, kills: int, signals: int, seed: int) -> dict[str, Any]:
    reference = work / "reference"
    log = work / "jobs.log"
    done = subprocess.run(
        job(reference, steps, every, f"--checkpoint.keep_every={every}"), cwd=ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference_at = {
        int(p.name.split("_")[1]): contents(p) for p in checkpoint.checkpoint_root(reference).glob("step_*")
    }
    rng = random.Random(seed)
    save_kills = max(1, kills // 3)
    events = ["kill"] * (kills - save_kills) + ["kill_in_save"] * save_kills + ["usr1"] * signals + ["rank"]
    rng.shuffle(events)
    run = work / "chaos"
    rows, compared, equal, lost_checkpoints, dead_rank_s = [], 0, 0, 0, None
    mismatches: list[str] = []
    checked: set[int] = set()
    for event in [*events, "finish"]:
        before, since = latest_step(run), metrics_size(run)
        proc = start(job(run, steps, every, "--checkpoint.resume=auto", "--checkpoint.keep_last=2"), log)
        target = min(steps - 1, before + rng.randint(1, every + 1))
        if event == "kill_in_save":
            next_save = min(steps, (before // every + 1) * every)
            partial = checkpoint.checkpoint_root(run) / f"step_{next_save:08d}.partial"
            hit = wait_until(partial.exists, proc, poll=0.001)
        elif event == "finish":
            hit = False
        else:
            hit = wait_until(lambda target=target, since=since: last_step(run, since) >= target, proc)
        struck = time.time()
        if hit and event in ("kill", "kill_in_save"):
            os.killpg(proc.pid, signal.SIGKILL)
        elif hit and event == "usr1":
            os.killpg(proc.pid, signal.SIGUSR1)
        elif hit and event == "rank":
            victim = rank_process(proc, 1)
            hit = victim is not None
            if hit:
                victim.kill()
        code = proc.wait(timeout=600)
        ended_s = time.time() - struck
        if hit and event == "rank":
            dead_rank_s = ended_s
        reached, after = last_step(run), latest_step(run)
        try:
            loadable = after == 0 or checkpoint.check_loadable(checkpoint.locate(run)) is None
        except checkpoint.CheckpointError:
            loadable = False
        lost_checkpoints += (not loadable) + (after < before)
        clean_exit = code == 0 or (hit and event in ("kill", "kill_in_save", "rank"))
        survived = loadable and clean_exit and reached - after <= every
        for step in sorted(set(reference_at) - checked):
            ckpt = checkpoint.checkpoint_root(run) / f"step_{step:08d}"
            if ckpt.is_dir():
                checked.add(step)
                compared += 1
                differ = differences(contents(ckpt), reference_at[step])
                equal += not differ
                mismatches += differ[:5]
        label = event if hit or event == "finish" else f"{event} (run ended first)"
        rows.append([label, before, reached, after, reached - after, code, survived])
        subprocess.run(["pkill", "-9", "-f", f"train.run_dir={run}"], check=False)  # nothing may outlive a job
    final_equal = not differences(contents(checkpoint.locate(run)), reference_at[steps])
    interruptions = [r for r in rows if r[0] in ("kill", "kill_in_save", "usr1", "rank")]
    return {
        "rows": rows,
        "faults_planned": len(events),
        "interruptions": len(interruptions),
        "kills_survived": sum(r[6] for r in interruptions),
        "checkpoints_compared": compared,
        "checkpoints_bitwise_equal": equal,
        "final_bitwise_equal": final_equal,
        "first_mismatches": sorted(set(mismatches))[:10],
        "checkpoints_lost": lost_checkpoints,
        "max_steps_lost": max((r[4] for r in interruptions), default=0),
        "checkpoint_interval": every,
        "dead_rank_ended_job_s": dead_rank_s,
    }


def nan_run(work: Path, steps: int, every: int) -> dict[str, Any]:
    """A NaN in rank 1's views at one step (``benchmarks/_inject_nan.py``)."""
    run = work / "nan"
    nan_step = steps // 2
    result = subprocess.run(
        job(run, steps, every, script=INJECT),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MOCO_NAN_AT_STEP": str(nan_step)},
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = contents(checkpoint.locate(run))
    finite = all(
        torch.isfinite(v).all() for v in final.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    return {
        "exit_code": result.returncode,
        "nan_step_logged_null": any(r["step"] == nan_step + 1 and r["loss"] is None for r in records),
        "skipped_steps": records[-1]["skipped_steps"],
        "final_step": records[-1]["step"],
        "checkpoint_finite": bool(finite),
    }


def demo_samples() -> list[tuple[str, bytes, int]]:
    """The demo's training images as ``(key, jpeg, label)``, read back from its shards."""
    samples = []
    for shard in sorted(ensure_demo_shards()["train"].glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, payload in members.items():
            if name.endswith(".jpg"):
                key = name.removesuffix(".jpg")
                samples.append((key.rsplit("/", 1)[-1], payload, int(members.get(f"{key}.cls", b"-1"))))
    return samples


def fuzzed_images(samples: list[tuple[str, bytes, int]], seed: int) -> list[tuple[str, bytes, int]]:
    """``samples`` in five formats, about three in four with random damage (flipped bytes, a truncation, a
    header byte)."""
    rng = random.Random(seed)
    fuzzed = []
    for i, (key, jpeg, label) in enumerate(samples):
        buffer = io.BytesIO()
        image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((48, 48))
        image.save(buffer, ["JPEG", "PNG", "BMP", "GIF", "TIFF"][i % 5])
        data = bytearray(buffer.getvalue())
        damage = rng.choice(["none", "flip", "truncate", "header"])
        if damage == "flip":
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif damage == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif damage == "header":
            data[rng.randrange(min(32, len(data)))] = 0xFF
        fuzzed.append((f"fuzz-{key}", bytes(data), label))
    return fuzzed


def decodes(payload: bytes) -> bool:
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(payload)) as image:
            warnings.simplefilter("ignore")
            image.load()
            image.convert("RGB")
    except Exception:
        return False
    return True


def bad_input_runs(work: Path, fuzz: int, seed: int) -> dict[str, Any]:
    """One-line errors before compute for a damaged manifest or shard; fuzzed images skipped and counted."""
    samples = demo_samples()
    outcomes = {}
    for damage in ("truncated_manifest", "truncated_shard"):
        folder = work / damage
        write_shards(samples, folder, samples_per_shard=500)
        if damage == "truncated_manifest":
            manifest = folder / "manifest.json"
            manifest.write_text(manifest.read_text()[:50])
        else:
            shard = sorted(folder.glob("*.tar"))[1]
            os.truncate(shard, shard.stat().st_size // 2)
        result = subprocess.run(
            job(work / f"{damage}-run", 4, 0, f"--data.path={folder}"), cwd=ROOT, capture_output=True, text=True
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        outcomes[damage] = {
            "exit_code": result.returncode,
            "one_line_error": len(errors) >= 1 and "Traceback" not in result.stderr,
            "error": errors[0] if errors else result.stderr[-300:],
        }
    fuzzed = fuzzed_images(random.Random(seed).sample(samples, fuzz), seed)
    write_shards(fuzzed, work / "fuzz", samples_per_shard=max(1, fuzz // 4))
    pil_fails = sum(not decodes(payload) for _, payload, _ in fuzzed)
    steps = (fuzz - pil_fails) // 32 + 2  # one rank, 32 a batch: more than one pass over every fuzzed image
    command = job(work / "fuzz-run", steps, 0, f"--data.path={work / 'fuzz'}", "--data.backend=torch", nproc=1)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(line) for line in (work / "fuzz-run" / "metrics.jsonl").read_text().splitlines()]
    outcomes["fuzzed_shard"] = {
        "exit_code": result.returncode,
        "images": len(fuzzed),
        "pil_fails": pil_fails,
        "bad_samples_logged": records[-1].get("bad_samples"),
        "traceback": "Traceback" in result.stderr,
    }
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="1 kill, 1 signal, short runs (CI)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--signals", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64, help="enough for every fault to strike before the end")
    parser.add_argument("--every", type=int, default=3, help="checkpoint interval in steps")
    parser.add_argument("--fuzz", type=int, default=200, help="fuzzed images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.kills, args.signals, args.steps, args.every, args.fuzz = 1, 1, 12, 2, 20
    ensure_demo_shards()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        started = time.time()
        result = chaos(work, args.steps, args.every, args.kills, args.signals, args.seed)
        result["nan"] = nan_run(work, args.steps, args.every)
        result["bad_inputs"] = bad_input_runs(work, args.fuzz, args.seed)
        result["wall_s"] = time.time() - started
        if args.json:  # every job's output, for whoever reads a failed row
            shutil.copy(work / "jobs.log", Path(args.json).with_suffix(".jobs.log"))
    headers = ["fault", "from step", "reached", "checkpoint after", "steps lost", "exit", "survived"]
    print(format_table(headers, result["rows"]))
    summary = [
        ["faults that struck before the run ended", f"{result['interruptions']} / {result['faults_planned']}"],
        ["kills and signals survived", f"{result['kills_survived']} / {result['interruptions']}"],
        [
            "checkpoints bitwise equal to the reference",
            f"{result['checkpoints_bitwise_equal']} / {result['checkpoints_compared']}",
        ],
        ["final state bitwise equal", result["final_bitwise_equal"]],
        ["checkpoints lost", result["checkpoints_lost"]],
        ["most steps lost by one fault (interval)", f"{result['max_steps_lost']} ({args.every})"],
        ["seconds until a dead rank ended the job", result["dead_rank_ended_job_s"]],
        ["NaN step skipped, run finished, checkpoint finite", f"{result['nan']}"],
        ["bad inputs", json.dumps(result["bad_inputs"])],
    ]
    print(format_table(["what", "result"], summary))
    result["survived_fraction"] = result["kills_survived"] / max(1, result["interruptions"])
    write_json(args.json, {"environment": environment(), "args": vars(args), **result})
    missed = goals_missed(result, args.every)
    if missed:
        sys.exit(f"goals not met: {'; '.join(missed)}")
    print("every goal met")


def goals_missed(result: dict[str, Any], every: int) -> list[str]:
    """The issue's goals, and what each fault must end in, that this run did not meet."""
    bad = result["bad_inputs"]
    checks = {
        "every fault struck before the run ended": result["interruptions"] == result["faults_planned"],
        "every kill and signal survived": result["kills_survived"] == result["interruptions"],
        "a dead rank ended the job": result["dead_rank_ended_job_s"] is not None,
        "every checkpoint bitwise equal": result["checkpoints_bitwise_equal"] == result["checkpoints_compared"] > 0,
        "final state bitwise equal": result["final_bitwise_equal"],
        "no checkpoint lost": result["checkpoints_lost"] == 0,
        "at most one interval lost per fault": result["max_steps_lost"] <= every,
        "NaN step skipped and the run finished with finite weights": result["nan"]["exit_code"] == 0
        and result["nan"]["skipped_steps"] == 1
        and result["nan"]["checkpoint_finite"],
        "damaged manifest and shard refused in one line (exit 2)": all(
            bad[k]["exit_code"] == 2 and bad[k]["one_line_error"] for k in ("truncated_manifest", "truncated_shard")
        ),
        "fuzzed images skipped and counted": bad["fuzzed_shard"]["exit_code"] == 0
        and bad["fuzzed_shard"]["bad_samples_logged"] >= bad["fuzzed_shard"]["pil_fails"] > 0,
    }
    return [name for name, met in checks.items() if not met]


if __name__ == "__main__":
    main()
