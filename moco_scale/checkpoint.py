"""Sharded checkpoints through the engine (DeepSpeed or FSDP2), with everything MoCo needs to continue bitwise.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/          the engine's files, named by its ``CheckpointLayout`` (engine/base.py):
                            DeepSpeed's (module incl. key encoder, queue and BN buffers; optimizer
                            shards, one per rank; under ZeRO-3 the parameter partitions too) or
                            torch.distributed.checkpoint's (FSDP2: .metadata and one .distcp per rank)
                            + rank_00000.pt, rank_00001.pt, ... (each rank's loader position and
                            RNG states; the step, epoch, config and world size; with
                            moco.shard_queue its slice of the queue, which the engine's files,
                            holding rank 0's buffers, cannot hold)
    latest                  the tag of the newest complete checkpoint
    set_aside/step_00000200-1767225600/step_00000300/, ...
                            checkpoints newer than the one a run resumed from (a roll-back with
                            ``checkpoint.resume=<run>/checkpoints/step_00000200``, or ones skipped as
                            damaged), moved there at the start of that run (named after the checkpoint
                            resumed and the Unix time), never deleted by moco_scale

No checkpoint is lost. A checkpoint is written under ``<tag>.partial``; every rank flushes (fsync)
the files it wrote, rank 0 checks that it sees every rank's file (``run_dir`` must be on a file
system all ranks share), flushes the folder, renames it to ``<tag>`` and replaces ``latest``
atomically, so a crash during a save leaves the previous checkpoint loadable. Pruning
(``keep_last``, ``keep_every``) removes only checkpoints older than the one just written. A fresh
run (``resume=""``) refuses a run directory that holds checkpoints, as does a run resuming another
run's checkpoint there; ``resume=auto`` that finds checkpoints but none loadable is an error naming
what is wrong with each; only an empty or missing ``checkpoints`` folder starts afresh.

No code runs from a checkpoint's rank files: they hold tensors and plain values only (the numpy
RNG state as a tensor and ints), and are read with ``torch.load(weights_only=True)``. DeepSpeed's
and torch.distributed.checkpoint's own readers unpickle their files fully, so resume only
checkpoints from a trusted source.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moco_scale.fileio import fsync_dir, fsync_file, write_atomically

if TYPE_CHECKING:
    from moco_scale.engine.base import CheckpointLayout

LATEST = "latest"
SET_ASIDE = "set_aside"
VISIBILITY_WAIT_S = 5.0  # how long rank 0 waits for the other ranks' files to appear (attribute caches)
_MESSAGE_BYTES = 4096


class CheckpointError(ValueError):
    """An unusable checkpoint; the message is one line naming what is wrong."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        numpy_state = (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)  # a tuple holding an array in rank files written before it was a dict
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _legacy_numpy_globals() -> list[Any]:
    """What the numpy RNG state of older rank files unpickles to: one uint32 array (no code runs)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_plain(file: Path) -> Any:
    """A file moco_scale wrote itself, read on the CPU with ``weights_only=True``: tensors and plain
    values only, so nothing in it can run code. One-line errors."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:
        if "Weights only load failed" in str(err):  # torch's unpickler refused it before running anything
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = found.group(1) if found else "Python objects"
            raise CheckpointError(
                f"{file} holds {what}, not only tensors and plain values; refused (no code from it was run)"
            ) from None
        raise CheckpointError(f"{file} is truncated or unreadable") from None


_SCALARS = (str, bytes, int, float, bool, type(None))  # exactly these: an IntEnum would pickle its class


def _plain(tree: Any, where: str = "") -> Any:
    """``tree`` as tensors and plain values (numpy scalars and arrays converted), which
    ``weights_only=True`` loads back; a TypeError names anything else."""
    if type(tree) in _SCALARS or isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, dict):
        return {_plain(key, where): _plain(value, f"{where}.{key}") for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        items = (_plain(value, f"{where}[{i}]") for i, value in enumerate(tree))
        return tuple(items) if isinstance(tree, tuple) else list(items)
    raise TypeError(f"checkpoint value {where or 'root'} is a {type(tree).__name__}, not a tensor or plain value")


def rank_local_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules whose state differs from rank to rank (``rank_local = True``, e.g. a sharded queue).
    A backend checkpoints rank 0's copy of every buffer, so each rank's file holds its own copy of these."""
    return {name: module for name, module in model.named_modules() if getattr(module, "rank_local", False)}


def _saved_rank_local(own: dict[str, Any]) -> dict[str, Any]:
    """A rank file's rank-local states; files written before ``rank_local`` held the sharded queue's alone."""
    if "rank_local" in own:
        return own["rank_local"]
    return {"queue": own["queue_slice"]} if own.get("queue_slice") is not None else {}


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def _writer(name: str, layout: CheckpointLayout) -> int | None:
    """The rank that writes the checkpoint file ``name``: a rank file's own, or the engine's (``layout``)."""
    own = re.fullmatch(r"rank_(\d+)\.pt", name)
    return int(own.group(1)) if own else layout.writer(name)


def _is_rank0() -> bool:
    """Rank 0 of the job, also before the process group exists (the launcher's RANK)."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _first_error(error: str, device: torch.device) -> str:
    """Every rank's view of whether any rank failed (acts as a barrier): ``""`` when none did, else the
    lowest failing rank's one-line message."""
    failed = torch.tensor([dist.get_rank() if error else dist.get_world_size()], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    src = int(failed.item())
    if src == dist.get_world_size():
        return ""
    return _broadcast_text(error, src, device)


def _broadcast_text(text: str, src: int, device: torch.device) -> str:
    """``src``'s one-line ``text`` on every rank (a fixed-size byte tensor: nothing is unpickled)."""
    buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if dist.get_rank() == src:
        data = text.encode()[:_MESSAGE_BYTES]
        buffer[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    buffer = buffer.to(device)
    dist.broadcast(buffer, src=src)
    return bytes(buffer.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def save(
    engine,
    run_dir: str | Path,
    step: int,
    loader_state: dict,
    config: dict,
    keep_last: int,
    keep_every: int = 0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Every rank writes its shard of ``step``'s checkpoint; it becomes ``latest`` once all are done and flushed.
    ``meta`` is recorded beside the step (``epoch``: samples consumed / samples in the data, fractional;
    ``run_ids``: the loggers' runs a resumed run continues).
    Checkpoints older than this one beyond the last ``keep_last`` are deleted, except every ``keep_every``-th
    step; newer ones and this one never are. A failure on any rank (a write, or rank 0 not seeing another
    rank's file) raises the same one-line CheckpointError on every rank, and nothing is published."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step:08d}"
    partial = root / f"{tag}.partial"
    rank = dist.get_rank()
    device = _collective_device()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name)
    error = ""
    try:
        rank_local = rank_local_modules(engine.model)
        state = {
            "epoch": 0.0,
            **(meta or {}),
            "step": step,
            "config": config,
            "loader": loader_state,
            "rng": rng_state(),
            "world_size": dist.get_world_size(),
            "reshardable": engine.reshardable and not rank_local,
            "rank_local": {name: module.state_dict() for name, module in rank_local.items()},
        }
        torch.save(_plain(state), _rank_file(partial, rank))
        for file in partial.iterdir():  # what this rank wrote, flushed before anything names it
            if _writer(file.name, engine.layout) == rank and file.is_file():
                fsync_file(file)
    except Exception as err:  # e.g. a full disk (torch.save raises RuntimeError then): every rank must hear of it
        error = f"rank {rank} could not write its part of {partial}: {_one_line(err)}"
    if error := _first_error(error, device):  # every shard is on disk, or every rank raises
        raise CheckpointError(error)
    final = root / tag
    if rank == 0:
        try:
            _publish(partial, final, dist.get_world_size())
            _prune(root, tag, keep_last, keep_every)
        except Exception as err:
            error = _one_line(err) if isinstance(err, CheckpointError) else f"publishing {partial}: {_one_line(err)}"
    if error := _broadcast_text(error, 0, device):
        raise CheckpointError(error)
    return final


def _invisible_rank_files(partial: Path, world_size: int) -> list[str]:
    """The rank files of ``partial`` that this process cannot see, after waiting up to VISIBILITY_WAIT_S."""
    deadline = time.monotonic() + VISIBILITY_WAIT_S
    while True:
        missing = [_rank_file(partial, r).name for r in range(world_size) if not _rank_file(partial, r).is_file()]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def _publish(partial: Path, final: Path, world_size: int) -> None:
    """Rank 0: rename the complete, flushed ``partial`` to ``final`` and point ``latest`` at it, durably."""
    missing = _invisible_rank_files(partial, world_size)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(
            f"rank 0 cannot see {shown} that the other ranks wrote into {partial}: "
            "train.run_dir must be on a file system all ranks share"
        )
    fsync_dir(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    fsync_dir(final.parent)
    write_atomically(final.parent / LATEST, final.name)


def _prune(root: Path, tag: str, keep_last: int, keep_every: int) -> None:
    """Delete checkpoints older than ``tag`` beyond the newest ``keep_last`` (``tag`` included), except
    every ``keep_every``-th step. ``tag`` itself (what ``latest`` names) and newer ones are never deleted."""
    older = [path for path in _tags_newest_first(root) if path.name < tag]
    for old in older[max(keep_last - 1, 0) :]:
        if not (keep_every and _step_of(old) % keep_every == 0):
            shutil.rmtree(old, ignore_errors=True)


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
    warning), or none when there are no checkpoints; else the given checkpoint, run directory or
    checkpoints folder, which must be loadable.

    One-line errors, before any compute, when ``run_dir``'s checkpoints would be overwritten: a fresh
    run there, or one resuming another run's checkpoint there, while it holds checkpoints; or ``auto``
    finding checkpoints of which none loads. Read-only (safe on every rank at once); checkpoints newer
    than the one returned are moved away by :func:`set_aside_newer`."""
    root = checkpoint_root(run_dir)
    if not resume:
        path = None
    elif resume == "auto":
        path = _newest_loadable(root)
    else:
        path = locate(resume)
        check_loadable(path)
    _check_run_dir(path, root)
    if path is not None:
        check_world_size(path, world_size)
    return path


def _check_run_dir(resume_from: Path | None, root: Path) -> None:
    """A run starting at ``resume_from`` (None: step 0) may write into ``root`` without overwriting or
    pruning checkpoints of another run or another timeline."""
    existing = _tags_newest_first(root)
    if not existing:
        return
    held = f"{root} already holds checkpoints (newest {existing[0].name})"
    if resume_from is None:
        raise CheckpointError(
            f"{held}: resume them with --checkpoint.resume=auto, or start fresh in another train.run_dir"
        )
    if resume_from.resolve().parent != root.resolve():
        raise CheckpointError(f"{held}; to resume {resume_from} without mixing runs, use another train.run_dir")


def set_aside_newer(resume_from: Path | None, run_dir: str | Path) -> Path | None:
    """At the start of a run resuming ``resume_from`` from its own ``run_dir``: move the checkpoints newer
    than it to ``checkpoints/set_aside/<resumed tag>-<unix time>/`` (not deleted) and point ``latest`` at
    it, so that the run's saves and pruning never meet them. Returns that folder, or None when nothing moved.

    Called by every rank of the launch, before the process group exists; only rank 0 (the launcher's RANK)
    acts and the others need not wait for it: they read only ``resume_from``, which never moves, and the
    checkpoints it moves are ones no rank resumes (newer than ``resume_from``, which all ranks chose alike);
    the first save's barriers order every later write after it. ``latest`` is rewritten before the moves,
    so a crash in between leaves a run directory that ``resume=auto`` resumes from ``resume_from`` again."""
    if resume_from is None or not _is_rank0():
        return None
    root = checkpoint_root(run_dir)
    if not root.is_dir() or resume_from.resolve().parent != root.resolve():
        return None
    pointer = root / LATEST
    if not pointer.is_file() or pointer.read_text().strip() != resume_from.name:
        write_atomically(pointer, resume_from.name)
    newer = [path for path in _tags_newest_first(root) if path.name > resume_from.name]
    if not newer:
        return None
    dest = root / SET_ASIDE / f"{resume_from.name}-{int(time.time())}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for path in newer:
            os.replace(path, dest / path.name)
        fsync_dir(dest)
        fsync_dir(root)
    except OSError as err:
        raise CheckpointError(
            f"could not set aside the checkpoints newer than {resume_from}: {_one_line(err)}"
        ) from None
    names = ", ".join(sorted(path.name for path in newer))
    print(f"resuming {resume_from.name}: moved the newer checkpoints ({names}) to {dest}", file=sys.stderr, flush=True)
    return dest


def _newest_loadable(root: Path) -> Path | None:
    """The newest loadable checkpoint in ``root`` up to what ``latest`` names; None only when ``root``
    holds no checkpoint folder at all, else a one-line error naming what is wrong with each."""
    pointer = root / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    problems, damaged = [], []
    for path in _tags_newest_first(root):
        if latest is not None and path.name > latest:
            problems.append(f"{path.name}: newer than what {LATEST} names ({latest})")
            continue
        try:
            check_loadable(path)
        except CheckpointError as err:
            problems.append(str(err).replace(f"{root}{os.sep}", ""))
            damaged.append(str(err))
            continue
        for problem in damaged if _is_rank0() else ():
            print(f"warning: skipping damaged checkpoint: {problem}", file=sys.stderr, flush=True)
        return path
    if problems:
        raise CheckpointError(f"{root} holds no loadable checkpoint: {'; '.join(problems)}")
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """Rank 0's file of checkpoint ``path``: step, epoch, config, world size, loader state, RNG."""
    file = _rank_file(path, 0)
    if not file.is_file():
        raise CheckpointError(f"{path}: no {file.name}; not a moco_scale checkpoint or an incomplete one")
    meta = _load_plain(file)
    if not isinstance(meta, dict) or "world_size" not in meta:
        raise CheckpointError(f"{file} is not a moco_scale rank file")
    return meta


def check_world_size(path: Path, world_size: int) -> None:
    meta = read_meta(path)
    saved = meta["world_size"]
    if saved != world_size and not meta.get("reshardable", True):
        engine = meta.get("config", {}).get("engine", {})
        what = "moco.shard_queue" if _saved_rank_local(meta) else f"ZeRO-{engine.get('zero_stage')}"
        raise CheckpointError(
            f"{path}: {what} checkpoints resume on the world size that wrote them ({saved} ranks), not {world_size}"
        )


def whole_torch_file(file: Path) -> bool:
    """Whether ``file`` is a whole ``torch.save`` zip (a truncated one has no directory)."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return False
    return True


def engine_layout(path: Path) -> CheckpointLayout:
    """The file layout of the backend that wrote checkpoint folder ``path``."""
    from moco_scale.engine import checkpoint_layouts

    layouts = checkpoint_layouts()
    for layout in layouts:
        if layout.wrote(path):
            return layout
    lacking = ", no ".join(layout.description for layout in layouts)
    raise CheckpointError(f"{str(path)!r} holds no checkpoint (no {lacking}, no {LATEST})")


def check_loadable(path: Path) -> None:
    """One-line errors for a damaged or incomplete checkpoint, found before any compute. Every rank file
    is read (``weights_only``): one that holds anything but tensors and plain values is refused; the
    engine's files are checked by its layout."""
    rank_files = sorted(path.glob("rank_*.pt"))
    if not rank_files:
        raise CheckpointError(f"{path}: no rank_*.pt files; not a moco_scale checkpoint or an incomplete one")
    for file in rank_files:
        if not whole_torch_file(file):
            raise CheckpointError(f"{file} is truncated or unreadable")
    metas = [_load_plain(file) for file in rank_files]
    if not all(isinstance(meta, dict) and "world_size" in meta for meta in metas):
        raise CheckpointError(f"{path}: a rank_*.pt file is not a moco_scale rank file")
    written_by = metas[0]["world_size"]
    layout = engine_layout(path)
    expected = [_rank_file(path, r) for r in range(written_by)] + layout.expected_files(path, written_by)
    missing = [file.name for file in expected if not file.is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    layout.check(path)


def load(engine, path: Path) -> tuple[int, dict, int]:
    """Restore the engine (model, key encoder, queue, BN statistics, optimizer) and this rank's RNG.

    Returns (step, loader state, world size that wrote it). On another world size the engine
    re-cuts its sharded optimizer state, ranks the checkpoint did not have take rank 0's RNG
    states, and the caller remaps the loader state. The rank file is read on the CPU with
    ``weights_only=True``.
    """
    own_file = _rank_file(path, dist.get_rank())
    own = _load_plain(own_file if own_file.is_file() else _rank_file(path, 0))
    check_world_size(path, dist.get_world_size())
    rank_local, saved_rank_local = rank_local_modules(engine.model), _saved_rank_local(own)
    if missing := sorted(rank_local.keys() - saved_rank_local.keys()):
        raise CheckpointError(
            f"{path} holds no per-rank state of {', '.join(missing)}: it was saved without moco.shard_queue=true"
        )
    engine.load_checkpoint(str(path.parent), tag=path.name, saved_world_size=own["world_size"])
    for name, module in rank_local.items():  # the backend restored rank 0's copy everywhere
        module.load_state_dict(saved_rank_local[name])
    set_rng_state(own["rng"])
    return own["step"], own["loader"], own["world_size"]
