"""Sharded checkpoints through the engine (DeepSpeed or FSDP2), with everything MoCo needs to continue bitwise.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/          the engine's files: DeepSpeed's (module incl. key encoder, queue and
                            BN buffers; optimizer shards, one per rank; under ZeRO-3 the parameter
                            partitions too) or torch.distributed.checkpoint's (FSDP2: .metadata and
                            one .distcp file per rank)
                            + rank_00000.pt, rank_00001.pt, ... (each rank's loader position and
                            RNG states; the step, epoch, config and world size; with
                            moco.shard_queue its slice of the queue, which the engine's files,
                            holding rank 0's buffers, cannot hold)
    latest                  the tag of the newest complete checkpoint

A checkpoint is written under ``<tag>.partial`` and renamed only after every rank has finished
writing it, then ``latest`` is replaced atomically, so a crash during a save leaves the previous
checkpoint loadable. (Across nodes this needs ``run_dir`` on a shared file system.)
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moco_scale.dist.queue import ShardedKeyQueue

LATEST = "latest"


class CheckpointError(ValueError):
    """An unusable checkpoint; the message is one line naming what is wrong."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _queue_slice(engine) -> ShardedKeyQueue | None:
    queue = getattr(engine.model, "queue", None)
    return queue if isinstance(queue, ShardedKeyQueue) else None


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def save(
    engine,
    run_dir: str | Path,
    step: int,
    loader_state: dict,
    config: dict,
    keep_last: int,
    keep_every: int = 0,
    epoch: float = 0.0,
) -> Path:
    """Every rank writes its shard of ``step``'s checkpoint; it becomes ``latest`` once all are done.
    ``epoch`` (samples consumed / samples in the data, fractional) is recorded beside the step.
    Older checkpoints beyond the last ``keep_last`` are deleted, except every ``keep_every``-th step."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step:08d}"
    partial = root / f"{tag}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name)
    queue = _queue_slice(engine)
    torch.save(
        {
            "step": step,
            "epoch": epoch,
            "config": config,
            "loader": loader_state,
            "rng": rng_state(),
            "world_size": dist.get_world_size(),
            "reshardable": engine.reshardable and queue is None,
            "queue_slice": queue.state_dict() if queue is not None else None,
        },
        _rank_file(partial, rank),
    )
    dist.barrier()  # every shard is on disk
    final = root / tag
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(tag)
        os.replace(pointer, root / LATEST)
        for old in _tags_newest_first(root)[keep_last:]:
            if not (keep_every and int(old.name.split("_")[1]) % keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _tags_newest_first(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")), reverse=True)


def locate(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names: itself, or what ``latest`` names in a run's ``checkpoints``
    folder or in a run directory."""
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"{str(given)!r} does not exist")
    for root in (given, checkpoint_root(given)):
        pointer = root / LATEST
        if pointer.is_file():
            tag = root / pointer.read_text().strip()
            if not tag.is_dir():
                raise CheckpointError(f"{pointer} names {tag.name!r}, which is not a folder")
            return tag
    if not given.is_dir():
        raise CheckpointError(f"{str(given)!r} is not a checkpoint folder")
    return given


def find_resume(resume: str, run_dir: str | Path, world_size: int) -> Path | None:
    """The checkpoint to resume from on ``world_size`` ranks, checked to be complete: none for ``""``;
    for ``auto`` the newest complete one under ``run_dir`` (falling back past damaged ones with a
    warning), or none; else the given checkpoint, run directory or checkpoints folder, which must be
    loadable."""
    if not resume:
        return None
    if resume != "auto":
        path = locate(resume)
        check_loadable(path)
    else:
        path = _newest_loadable(checkpoint_root(run_dir))
    if path is not None:
        check_world_size(path, world_size)
    return path


def _newest_loadable(root: Path) -> Path | None:
    pointer = root / LATEST
    latest = root / pointer.read_text().strip() if pointer.is_file() else None
    candidates = [p for p in _tags_newest_first(root) if latest is None or p.name <= latest.name]
    for path in candidates:
        try:
            check_loadable(path)
            return path
        except CheckpointError as err:
            if dist.is_initialized() and dist.get_rank() != 0:
                continue
            print(f"warning: skipping damaged checkpoint: {err}", file=sys.stderr, flush=True)
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """Rank 0's file of checkpoint ``path``: step, epoch, config, world size, loader state, RNG."""
    file = _rank_file(path, 0)
    if not file.is_file():
        raise CheckpointError(f"{path}: no {file.name}; not a moco_scale checkpoint or an incomplete one")
    try:
        meta = torch.load(file, map_location="cpu", weights_only=False)
    except Exception:
        raise CheckpointError(f"{file} is truncated or unreadable") from None
    model_file = path / "mp_rank_00_model_states.pt"
    if "config" not in meta and model_file.is_file():  # written before the rank files carried it
        states = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)
        meta |= {key: states[key] for key in ("config", "epoch") if key in states}
    return meta


def check_world_size(path: Path, world_size: int) -> None:
    meta = read_meta(path)
    saved = meta["world_size"]
    if saved != world_size and not meta.get("reshardable", True):
        engine = meta.get("config", {}).get("engine", {})
        what = "moco.shard_queue" if meta.get("queue_slice") is not None else f"ZeRO-{engine.get('zero_stage')}"
        raise CheckpointError(
            f"{path}: {what} checkpoints resume on the world size that wrote them ({saved} ranks), not {world_size}"
        )


def check_loadable(path: Path) -> None:
    """One-line errors for a damaged or incomplete checkpoint, found before any compute."""
    rank_files = sorted(path.glob("rank_*.pt"))
    if not rank_files:
        raise CheckpointError(f"{path}: no rank_*.pt files; not a moco_scale checkpoint or an incomplete one")
    for file in path.glob("*.pt"):
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save's format: a truncated file has no directory
                archive.infolist()
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(f"{file} is truncated or unreadable") from None
    written_by = torch.load(rank_files[0], weights_only=False)["world_size"]
    expected = [_rank_file(path, r) for r in range(written_by)]
    if any(path.glob("zero_pp_rank_*")):  # ZeRO 1-3: one optimizer shard per rank
        expected += [path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(written_by)]
    if any(path.glob("*.distcp")):  # torch.distributed.checkpoint: an index and one file per rank
        expected += [path / ".metadata"] + [path / f"__{r}_0.distcp" for r in range(written_by)]
    missing = [file.name for file in expected if not file.is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    if (path / ".metadata").is_file():
        _check_distcp_sizes(path)


def _check_distcp_sizes(path: Path) -> None:
    """Every byte range that torch.distributed.checkpoint's index names lies inside its file."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:
        raise CheckpointError(f"{path / '.metadata'} is truncated or unreadable") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated or missing")


def load(engine, path: Path) -> tuple[int, dict, int]:
    """Restore the engine (model, key encoder, queue, BN statistics, optimizer) and this rank's RNG.

    Returns (step, loader state, world size that wrote it). On another world size the engine
    re-cuts its sharded optimizer state, ranks the checkpoint did not have take rank 0's RNG
    states, and the caller remaps the loader state.
    """
    own_file = _rank_file(path, dist.get_rank())
    own = torch.load(own_file if own_file.is_file() else _rank_file(path, 0), weights_only=False)
    check_world_size(path, dist.get_world_size())
    queue = _queue_slice(engine)
    if queue is not None and own.get("queue_slice") is None:
        raise CheckpointError(f"{path} holds a replicated queue, but moco.shard_queue=true")
    engine.load_checkpoint(str(path.parent), tag=path.name, saved_world_size=own["world_size"])
    if queue is not None:  # DeepSpeed restored rank 0's slice everywhere
        queue.load_state_dict(own["queue_slice"])
    set_rng_state(own["rng"])
    return own["step"], own["loader"], own["world_size"]
