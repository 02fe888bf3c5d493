"""One-view labelled loaders: the deterministic evaluation pass, and the linear probe's training stream.

Evaluation (:func:`eval_loader`). The samples are put in one fixed order: the input's parts (shards, or runs
of an ImageFolder's index: :mod:`moco_scale.data.sources`) sorted by name, then the order inside each part.
Rank r of W takes samples ``[r N // W, (r + 1) N // W)``, so over
all ranks every sample is evaluated exactly once and no remainder is dropped. A rank cuts its block
into batches; worker w of R builds batches w, w + R, ..., which the DataLoader's round robin hands
out in turn, so the batches of all ranks, concatenated in rank order, follow the parts' order for
any world size and worker count. Each worker reads (without decoding) the samples before its last
batch in every part it needs. Samples that do not decode (and places that a tar cut short does not
hold) are skipped and counted in the loader's ``bad_samples``: the batch that held one is smaller.

The evaluation view resizes the shorter side and takes the centre crop of ``image_size``: resized to
``image_size`` itself below 64 px (small images such as the demo's 32 px digits are used whole),
to ``image_size / 0.875`` from 64 px on (ImageNet's 256 -> 224 protocol). Both modes normalise
with the training views' mean and std.

Training (:func:`train_loader`). MoCo's linear-evaluation augmentation, a random-resized crop
(scale 0.08-1) and a horizontal flip, over the two-view loader's reader
(:class:`~moco_scale.data.torch_loader.TwoViewStream`): the same per-rank sharding, shuffling,
per-sample seeding and counting of bad samples; endless.

The workers of both ignore SIGUSR1, SIGTERM and SIGINT, which are the main process's to act on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, LINEAR_EVAL, ViewSpec
from moco_scale.data.shards import StreamSpec
from moco_scale.data.sources import open_source
from moco_scale.data.torch_loader import (
    StreamBatches,
    TwoViewStream,
    decode_sample,
    ignore_stop_signals,
    stream_loader,
    view_transform,
)

CENTRE_CROP_FROM = 64  # px: from this size on, resize to size / 0.875 and centre-crop
CROP_FRACTION = 0.875


def linear_eval_view(size: int) -> ViewSpec:
    """MoCo's linear-classification training view: random-resized crop (scale 0.08-1) and flip only."""
    return ViewSpec(size, LINEAR_EVAL)


def eval_transform(size: int) -> T.Compose:
    """Resize the shorter side, centre-crop ``size``, normalise (see the module docstring)."""
    resize = round(size / CROP_FRACTION) if size >= CENTRE_CROP_FROM else size
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(resize, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def num_classes_of(inputs: list[str]) -> int | None:
    """The number of classes of an input: the class names that the shards' ``manifest.json`` files list, the class
    folders of an ImageFolder tree, or one more than a list file's largest label; None when shards list none."""
    return open_source(inputs).num_classes


class EvalBatches(IterableDataset):
    """This rank's ``(images, labels)`` batches of one evaluation pass (see the module docstring)."""

    def __init__(self, inputs: list[str], image_size: int, batch_size: int, rank: int, world_size: int):
        self.source = open_source(inputs)
        self.order = sorted(self.source.sizes)
        self.sizes = [self.source.sizes[part] for part in self.order]
        total = sum(self.sizes)
        self.start, self.stop = rank * total // world_size, (rank + 1) * total // world_size
        self.batch_size = batch_size
        self.transform = eval_transform(image_size)

    def _own_batch(self, position: int, worker: int, workers: int) -> int | None:
        """The index within this rank of the batch that holds ``position``, if it is this worker's."""
        if not self.start <= position < self.stop:
            return None
        batch = (position - self.start) // self.batch_size
        return batch if batch % workers == worker else None

    def _last_position(self, worker: int, workers: int) -> int:
        """One past the last position that this worker decodes (``start`` when it has no batch)."""
        batches = -(-(self.stop - self.start) // self.batch_size)
        mine = [b for b in range(batches) if b % workers == worker]
        if not mine:
            return self.start
        return min(self.stop, self.start + (mine[-1] + 1) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, int]]:
        """``(images, labels, bad)`` of each of this worker's batches, ``images`` None when all were bad."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = self._last_position(worker, workers)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        bad = 0
        current: int | None = None
        offset = 0
        for part, size in zip(self.order, self.sizes, strict=True):
            part_offset, offset = offset, offset + size
            if part_offset >= end or offset <= self.start:
                continue
            first = max(0, self.start - part_offset)
            samples = self.source.read(part, first)  # None: a place the part does not hold
            for index, sample in zip(range(first, size), samples, strict=False):
                position = part_offset + index
                if position >= end:
                    break
                batch = self._own_batch(position, worker, workers)
                if batch is None:
                    continue
                if batch != current and (images or bad):
                    yield torch.stack(images) if images else None, torch.tensor(labels, dtype=torch.int64), bad
                    images, labels, bad = [], [], 0
                current = batch
                decoded = decode_sample(sample)
                if decoded is None:
                    bad += 1
                    continue
                images.append(self.transform(decoded[0]))
                labels.append(decoded[1])
        if images or bad:
            yield torch.stack(images) if images else None, torch.tensor(labels, dtype=torch.int64), bad


class EvalLoader:
    """Re-iterable ``(images, labels)`` batches of one evaluation pass; ``bad_samples`` counts the samples of
    this rank's share that the last pass (or the one going on) skipped."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.bad_samples = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_samples = 0
        for images, labels, bad in self.loader:
            self.bad_samples += bad
            if images is not None:
                yield images, labels


def eval_loader(
    inputs: list[str],
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> EvalLoader:
    """Re-iterable ``(images, labels)`` batches of this rank's share of one pass over ``inputs`` (shards, or a
    folder or list)."""
    return EvalLoader(
        DataLoader(
            EvalBatches(inputs, image_size, batch_size, rank, world_size),
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals,
        )
    )


class LabelledTrainStream(IterableDataset):
    """An endless stream of ``(view, label, position)`` for one rank: the first view of ``stream`` of each sample,
    and the position of the reader that made it (as :class:`~moco_scale.data.torch_loader.TwoViewStream`'s)."""

    def __init__(self, stream: StreamSpec):
        self.reader = TwoViewStream(
            stream.inputs, stream.views, stream.rank, stream.world_size, stream.seed, stream.shuffle_buffer
        )
        self.transform = view_transform(stream.views[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        reader, _ = self.reader.reader()
        for image, label, position in self.reader.decoded():
            yield self.transform(image), label, torch.tensor([reader, *position])


def linear_eval_stream(
    inputs: list[str],
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
) -> StreamSpec:
    """The linear probe's training stream: :func:`linear_eval_view` of each sample of this rank's share."""
    view = linear_eval_view(image_size)
    return StreamSpec(inputs, (view, view), batch_size, rank, world_size, seed, shuffle_buffer)


def train_loader(stream: StreamSpec, *, workers: int = 0, pin_memory: bool = False) -> StreamBatches:
    """Endless ``(images, labels)`` batches of ``stream``'s first view (:func:`linear_eval_stream`) for its rank;
    ``bad_samples`` counts the samples skipped so far."""
    labelled = LabelledTrainStream(stream)
    readers, reader = max(1, workers), labelled.reader
    loader = stream_loader(labelled, reader.total, stream.batch_size, stream.world_size, workers, pin_memory)
    left_out = reader.source.left_out
    return StreamBatches(
        loader, [(0, 0, 0)] * readers, 0, reader.places_per_reader(readers), stream.world_size, left_out
    )
