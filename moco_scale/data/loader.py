"""Picks the two-view loader: DALI (GPU decode on a GPU, CPU otherwise) or the webdataset + torchvision fallback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moco_scale.data.augment import ViewSpec
from moco_scale.data.dali import DaliTwoViewLoader, dali_available
from moco_scale.data.shards import DataError, checked_with
from moco_scale.data.torch_loader import two_view_loader

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def resolve_backend(backend: str, shards: list[str]) -> str:
    """``auto`` is DALI when it imports and every image of the shards was checked with DALI's decoder
    (DALI stops on an image it cannot decode; the torch loader skips it), else torch. Asking for DALI
    without it, or over shards not checked with its decoder, is a one-line :class:`DataError`."""
    checked = "dali" in checked_with(shards)
    if backend == "auto":
        return "dali" if dali_available() and checked else "torch"
    if backend == "dali" and not dali_available():
        raise DataError("data.backend=dali but NVIDIA DALI is not installed (pip install -e '.[dali]')")
    if backend == "dali" and not checked:
        folders = sorted({str(Path(s).parent) for s in shards})
        raise DataError(
            f"data.backend=dali: the shards in {', '.join(folders)} were not checked with DALI's decoder, which "
            "stops on a corrupt image; run python -m moco_scale.data.make_shards --index-only FOLDER --check, "
            "or use data.backend=torch"
        )
    return backend


def two_view_batches(
    backend: str,
    shards: list[str],
    views: tuple[ViewSpec, ViewSpec],
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int,
    seed: int,
    shuffle_buffer: int,
    device: torch.device,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    state: dict | None = None,
) -> Iterator[Batch]:
    """Endless ``(view1, view2, labels)`` batches for this rank from the resolved ``backend``, with views
    in ``dtype`` (the engine's compute precision: half the bytes to copy and shuffle in bf16/fp16).

    DALI decodes on this rank's GPU (``mixed``) when ``device`` is CUDA and on the CPU otherwise,
    with ``workers`` CPU threads; the torch loader runs ``workers`` DataLoader processes. The result's
    ``state_dict()`` passed back as ``state`` (same backend, rank, world size and workers) continues
    the stream exactly where it was.
    """
    if resolve_backend(backend, shards) == "dali":
        return DaliTwoViewLoader(
            shards,
            views,
            batch_size,
            rank,
            world_size,
            seed=seed,
            device_id=device.index if device.type == "cuda" else None,
            num_threads=max(1, workers),
            dtype=dtype,
            channels_last=channels_last,
            shuffle_buffer=shuffle_buffer,
            checkpoint=state["dali"] if state else None,
        )
    return two_view_loader(
        shards,
        views,
        batch_size,
        rank,
        world_size,
        workers,
        seed,
        shuffle_buffer,
        pin_memory=device.type == "cuda",
        start_batch=state["batches"] if state else 0,
        dtype=dtype,
    )


def remap_state(state: dict, old_world_size: int, new_world_size: int) -> dict | None:
    """A loader position saved by ``old_world_size`` ranks, for ``new_world_size`` ranks.

    The torch loader keeps the number of samples consumed in total (batches x ranks), so the run
    continues at the same point of the same epoch, but which samples each rank sees from there on
    follows the new split: a few samples of that epoch may be seen twice or not at all. DALI's
    pipeline checkpoint belongs to one rank's reader, so DALI restarts its stream.
    """
    if old_world_size == new_world_size:
        return state
    if "batches" in state:
        return {"batches": state["batches"] * old_world_size // new_world_size}
    return None
