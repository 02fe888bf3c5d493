"""The webdataset + torchvision two-view loader (the fallback backend, and the one used today).

Shards are split across (rank, worker) readers; each epoch visits them in an order drawn from
(seed, epoch). With fewer shards than readers, every reader streams all shards and keeps every
n-th sample, so any world size works. Samples that fail to decode are skipped and counted.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec


def view_transform(spec: ViewSpec) -> T.Compose:
    """torchvision ops for one view, on uint8 image tensors."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(spec.size, scale=spec.crop_scale, antialias=True),
            T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
            T.RandomGrayscale(p=spec.grayscale_p),
            T.RandomApply([T.GaussianBlur(spec.blur_kernel, spec.blur_sigma)], p=spec.blur_p),
            T.RandomSolarize(threshold=128, p=spec.solarize_p),
            T.RandomHorizontalFlip(p=spec.flip_p),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """A webdataset sample's image and label (-1 when it has no ``cls``)."""
    payload = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
    if not payload:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image")
    image = Image.open(io.BytesIO(payload))
    image.load()
    label = int(sample["cls"]) if sample.get("cls") else -1
    return image.convert("RGB"), label


class TwoViewStream(IterableDataset):
    """An endless stream of ``(view1, view2, label)`` over epochs of WebDataset shards."""

    def __init__(
        self,
        shards: list[str],
        views: tuple[ViewSpec, ViewSpec],
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ):
        self.shards = shards
        self.transforms = (view_transform(views[0]), view_transform(views[1]))
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.bad_samples = 0

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        reader, readers = self._reader()
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        per_shard = len(order) >= readers
        mine = order[reader::readers] if per_shard else order
        stream = wds.WebDataset(
            mine,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
            handler=wds.warn_and_continue,
        )
        for i, sample in enumerate(stream):
            if per_shard or i % readers == reader:
                yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        reader, _ = self._reader()
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}/{epoch}/{reader}")
            for sample in self._shuffled(self._epoch_samples(epoch), rng):
                try:
                    image, label = decode_sample(sample)
                except (OSError, ValueError):
                    self.bad_samples += 1
                    continue
                yield self.transforms[0](image), self.transforms[1](image), label
            epoch += 1


def two_view_loader(
    shards: list[str],
    views: tuple[ViewSpec, ViewSpec],
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``(view1, view2, labels)`` for this rank, forever."""
    stream = TwoViewStream(shards, views, rank, world_size, seed, shuffle_buffer)
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
