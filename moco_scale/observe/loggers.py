"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``train.loggers``).

Each logger gets every record ``metrics.jsonl`` gets, under the same names (grouped as ``train/``, ``knn/``
and ``stage_ms/``), the health warnings as text, and the resolved config as hyper-parameters. Rank 0 only.
A resumed run continues the same TensorBoard folder (the events after its checkpoint's step are purged) and
the same W&B run (its id is kept in the checkpoint).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any, Protocol

import yaml

from moco_scale.observe.profiling import STAGE_PREFIX

LOGGERS: dict[str, tuple[str, str] | None] = {  # logger -> (the module it needs, the extra that installs it)
    "jsonl": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
WANDB_HOST = ("api.wandb.ai", 443)


def logger_problem(name: str) -> str | None:
    """Why ``train.loggers`` cannot hold ``name`` here (unknown, or its package missing), in one line."""
    if name not in LOGGERS:
        return f"train.loggers: unknown logger {name!r}; choices: {', '.join(LOGGERS)}"
    needs = LOGGERS[name]
    if needs and importlib.util.find_spec(needs[0]) is None:
        return f'train.loggers: {name} needs the {needs[0]} package: pip install -e ".[{needs[1]}]"'
    return None


def tag(key: str) -> str:
    """The dashboard name of a ``metrics.jsonl`` key."""
    if key.startswith(STAGE_PREFIX):
        return f"stage_ms/{key.removeprefix(STAGE_PREFIX)}"
    return f"knn/{key}" if key.startswith("knn_") else f"train/{key}"


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data.image_size": 224, ...}``: scalars as they are, lists and tuples as their text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


class Sink(Protocol):
    name: str
    run_id: str | None  # what a resumed run needs to continue the same run, if anything

    def scalars(self, record: dict[str, float], step: int) -> None: ...
    def text(self, message: str, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in ``<run_dir>/tensorboard``; resumed after ``start_step`` > 0, it hides the events the
    stopped run wrote after that step (TensorBoard's purge), so no step appears twice."""

    name, run_id = "tensorboard", None

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```", 0)
            for summary in hparams(flat_config(config), {}):
                self.writer.file_writer.add_summary(summary)

    def scalars(self, record: dict[str, float], step: int) -> None:
        for key, value in record.items():
            self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def text(self, message: str, step: int) -> None:
        self.writer.add_text("warnings", message, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when W&B's server answers within 3 s, offline otherwise."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    try:
        socket.create_connection(WANDB_HOST, timeout=3).close()
    except OSError:
        return "offline"
    return "online"


class WandbSink:
    """A W&B run in ``<run_dir>/wandb``, ``run_id`` continued when given (a resumed run)."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            dir=str(run_dir),
            config=flat_config(config),
            id=run_id,
            resume="allow",
            mode=wandb_mode(),
        )
        self.run_id: str = self.run.id

    def scalars(self, record: dict[str, float], step: int) -> None:
        self.run.log({tag(key): value for key, value in record.items()}, step=step)

    def text(self, message: str, step: int) -> None:
        self.run.log({"warnings": message}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(
    names: tuple[str, ...], run_dir: Path, config: dict[str, Any], start_step: int, run_ids: dict[str, str]
) -> list[Sink]:
    """The loggers of ``names`` beyond jsonl; ``run_ids`` are the ones a checkpoint kept (a resumed run)."""
    sinks: list[Sink] = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(run_dir, config, start_step))
    if "wandb" in names:
        sinks.append(WandbSink(run_dir, config, config["train"]["wandb_project"], run_ids.get("wandb")))
    return sinks


def run_ids(sinks: list[Sink]) -> dict[str, str]:
    """What a checkpoint keeps so a resumed run continues the same runs (the W&B run id)."""
    return {sink.name: sink.run_id for sink in sinks if sink.run_id}
