"""Picks the two-view loader: DALI (GPU decode on a GPU, CPU otherwise) or the webdataset + torchvision fallback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moco_scale.data.dali import DaliTwoViewLoader, dali_available
from moco_scale.data.shards import DataError, StreamSpec
from moco_scale.data.sources import is_folder, open_source
from moco_scale.data.torch_loader import two_view_loader

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
GLOBAL_POSITION = ("samples", "epoch_samples", "bad_samples")  # what every backend's state holds


@dataclass(frozen=True)
class LoaderLayout:
    """What a loader position depends on: a state continues exactly only under the layout that saved it."""

    backend: str  # as resolved: "torch" or "dali"
    world_size: int
    batch_size: int  # per rank
    workers: int
    seed: int
    shuffle_buffer: int

    @classmethod
    def of_run(cls, config: dict, world_size: int, backend: str) -> LoaderLayout:
        """The layout of a run whose config is ``config`` (``Config.to_dict()``, as a checkpoint holds it)."""
        data = config["data"]
        return cls(
            backend, world_size, config["train"]["batch_size"], data["workers"], data["seed"], data["shuffle_buffer"]
        )


def backend_of(state: dict | None) -> str | None:
    """Which loader saved ``state``: DALI's holds its pipeline checkpoint (None: no state)."""
    return None if state is None else "dali" if "dali" in state else "torch"


def resolve_backend(backend: str, inputs: list[str]) -> str:
    """``auto`` is DALI when it imports and every image of the input was checked with DALI's decoder
    (DALI stops on an image it cannot decode; the torch loader skips it), else torch. Asking for DALI
    without it, or over an input not checked with its decoder, is a one-line :class:`DataError`."""
    checked = "dali" in open_source(inputs).checked_with
    if backend == "auto":
        return "dali" if dali_available() and checked else "torch"
    if backend == "dali" and not dali_available():
        raise DataError("data.backend=dali but NVIDIA DALI is not installed (pip install -e '.[dali]')")
    if backend == "dali" and not checked:
        if is_folder(inputs):
            raise DataError(
                f"data.backend=dali: {inputs[0]} is not a checked list, and DALI stops on a corrupt image; run "
                f"python -m moco_scale.data.image_folder {inputs[0]} --out LIST and train on LIST, "
                "or use data.backend=torch"
            )
        folders = sorted({str(Path(s).parent) for s in inputs})
        raise DataError(
            f"data.backend=dali: the shards in {', '.join(folders)} were not checked with DALI's decoder, which "
            "stops on a corrupt image; run python -m moco_scale.data.make_shards --index-only FOLDER --check, "
            "or use data.backend=torch"
        )
    return backend


def two_view_batches(
    backend: str,
    stream: StreamSpec,
    *,
    workers: int,
    device: torch.device,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    state: dict | None = None,
) -> Iterator[Batch]:
    """Endless ``(view1, view2, labels)`` batches for this rank from the resolved ``backend``, with views
    in ``dtype`` (the engine's compute precision: half the bytes to copy and shuffle in bf16/fp16).

    DALI decodes on this rank's GPU (``mixed``) when ``device`` is CUDA and on the CPU otherwise,
    with ``workers`` CPU threads; the torch loader runs ``workers`` DataLoader processes, and on a GPU decodes
    the JPEGs and augments the batches there (:mod:`moco_scale.data.device_views`). The result's
    ``state_dict()`` passed back as ``state`` continues the stream exactly where it was under the same
    layout (see :func:`remap_state`), and restarts at its global sample count under another.
    """
    if resolve_backend(backend, stream.inputs) == "dali":
        return DaliTwoViewLoader(
            stream,
            device_id=device.index if device.type == "cuda" else None,
            num_threads=max(1, workers),
            dtype=dtype,
            channels_last=channels_last,
            state=state,
        )
    on_gpu = device.type == "cuda"
    augment_on = device if on_gpu else None  # no DALI on a GPU: decode and augment there (device_views)
    return two_view_loader(stream, workers, pin_memory=on_gpu, state=state, dtype=dtype, augment_on=augment_on)


def remap_state(state: dict | None, saved: LoaderLayout | int, current: LoaderLayout | int) -> dict | None:
    """A loader state saved under the ``saved`` layout, for the ``current`` one (or world sizes alone).

    The same layout keeps the state whole: the stream continues exactly. Any change keeps only the global
    sample count, ``samples`` (consumed by all ranks together, good or bad), ``epoch_samples`` (per epoch
    in the saved layout) and ``bad_samples``: the torch loader restarts in the same epoch at the same
    fraction of it, split evenly over its readers, so a few samples of that epoch may be seen twice or
    not at all; DALI, which resumes only from its own checkpoint, starts a new pass of its reader and
    counts on from there. A state from before positions were saved (``{"batches": n}``) gives None: the
    stream starts afresh.
    """
    if state is None or saved == current:
        return state
    if "samples" not in state:
        return None
    return {key: state[key] for key in GLOBAL_POSITION}
