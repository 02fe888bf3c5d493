"""train.loggers: TensorBoard and W&B get what metrics.jsonl gets, read back from the files they write; a
resumed run continues them without a step twice; a missing package is a one-line error before compute."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moco_scale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER, DEMO = ROOT / "launchers" / "pretrain.py", ROOT / "configs" / "demo.yaml"


def test_an_unknown_logger_or_a_missing_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="train.loggers: unknown logger 'tensorbored'; choices: jsonl, tensorboard"):
        load_config(None, {"train.loggers": "[jsonl,tensorbored]"})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(
        ConfigError, match=r'train.loggers: wandb needs the wandb package: pip install -e "\.\[wandb\]"'
    ):
        load_config(None, {"train.loggers": "[jsonl,wandb]"})
    assert load_config(None, {"train.loggers": "[jsonl,tensorboard]"}).train.loggers == ("jsonl", "tensorboard")


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] in the order TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_texts(log_dir: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [t.tensor_proto.string_val[0].decode() for t in events.Tensors(tag)]


def wandb_records(path: Path) -> Iterator:
    """The records of a W&B ``.wandb`` file: a 7-byte header, then a LevelDB-style log of 32 KiB blocks, each
    record in chunks behind a (crc32, length, kind) header (kind 1: whole, 2/3/4: first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:header] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, pieces = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:
            break
        pieces += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def wandb_history(run_dir: Path) -> list[tuple[str, dict[str, dict[int, object]]]]:
    """(run id, key -> {step: value}) of each offline run folder in the order written (a resumed run adds one)."""
    runs = []
    for file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        history: dict[str, dict[int, object]] = {}
        runs.append((file.stem.removeprefix("run-"), history))
        for record in wandb_records(file):
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                for key, value in items.items():
                    history.setdefault(key, {})[items["_step"]] = value
    return runs


def wandb_config(run_dir: Path) -> dict[str, object]:
    config = {}
    for file in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):  # the run's first config, then any updates
                update = record.run.config.update if kind == "run" else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in update})
    return config


def _pretrain(run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCHER), "--config", str(DEMO), f"--train.run_dir={run_dir}", *flags]
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tensorboard_and_wandb_get_every_metric_and_a_resumed_run_continues_them(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    flags = [
        "--train.loggers=[jsonl,tensorboard,wandb]",
        "--train.max_steps=4",
        "--train.log_every=1",
        "--checkpoint.every_steps=2",
        "--checkpoint.keep_last=3",
        "--eval.every_steps=0",
        "--moco.queue_size=1024",  # over a quarter of the digits: a health warning, which must reach both
        "--train.progress=false",
    ]
    _pretrain(run_dir, *flags)
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key in ("loss", "inst_acc", "lr", "momentum", "pairs_per_s", "ms_query_fwd_bwd", "bad_samples"):
        tag = f"stage_ms/{key[3:]}" if key.startswith("ms_") else f"train/{key}"
        assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in first], key
    assert any(
        "moco.queue_size=1024 is over a quarter" in text
        for text in tensorboard_texts(run_dir / "tensorboard", "warnings/text_summary")
    )
    ((run_id, history),) = wandb_history(run_dir)
    assert history["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in first}, rel=1e-6)
    assert any("is over a quarter" in str(text) for text in history["warnings"].values())
    config = wandb_config(run_dir)
    assert config["model.arch"] == "resnet18" and config["train.max_steps"] == 4  # the resolved config

    # Resume from step 2 of the same run: steps 3 and 4 again, each once, in the same TensorBoard folder and
    # the same W&B run (its id kept in the checkpoint).
    (run_dir / "metrics.jsonl").write_text("")
    _pretrain(run_dir, *flags, f"--checkpoint.resume={run_dir / 'checkpoints' / 'step_00000002'}")
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3, 4]
    losses = tensorboard_scalars(run_dir / "tensorboard")["train/loss"]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in first[:2] + resumed]  # no step twice
    (first_id, _), (resumed_id, history) = wandb_history(run_dir)
    assert first_id == resumed_id == run_id  # the same W&B run, continued
    assert history["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in resumed}, rel=1e-6)


def test_wandb_runs_offline_when_its_server_cannot_be_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from moco_scale.observe import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    with socket.socket() as server:  # a listening port stands for a reachable server
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(loggers, "WANDB_HOST", server.getsockname())
        assert loggers.wandb_mode() == "online"
    monkeypatch.setattr(loggers, "WANDB_HOST", ("127.0.0.1", free_closed_port()))
    assert loggers.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    assert loggers.wandb_mode() == "disabled"


def free_closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
