"""The webdataset + torchvision two-view loader (the fallback backend).

Sharding. Each epoch, the shards are put in an order drawn from (seed, epoch) and their samples
laid end to end; rank r takes the r-th of W equal contiguous blocks, so every sample is seen
exactly once per epoch across all ranks, except the last ``N mod W`` samples of that epoch's
order (fewer than W), which are dropped. Any world size works, including more ranks than
shards. Within a rank, workers split the block the same way, and a seeded shuffle buffer mixes
samples. Each sample's augmentation is seeded by (seed, epoch, its position in the epoch), so the
views do not depend on which worker drew them.

Resuming. The stream is a pure function of (seed, rank, world size, workers, batch size), so
``start_batch=n`` restarts exactly after the n-th batch this rank consumed: each worker skips
its share of the undecoded samples.
"""

from __future__ import annotations

import io
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, blur_window
from moco_scale.data.shards import IMAGE_EXTENSIONS, DataError, excluded_samples, shard_sizes


class SigmaGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma drawn uniformly from ``sigma_range`` and a window sized to it."""

    def __init__(self, sigma_range: tuple[float, float]):
        super().__init__()
        self.sigma_range = sigma_range

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.empty(()).uniform_(*self.sigma_range))
        return TF.gaussian_blur(image, [blur_window(sigma)] * 2, [sigma, sigma])


def view_transform(spec: ViewSpec) -> T.Compose:
    """torchvision ops for one view, on uint8 image tensors."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(spec.size, scale=spec.crop_scale, antialias=True),
            T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
            T.RandomGrayscale(p=spec.grayscale_p),
            T.RandomApply([SigmaGaussianBlur(spec.blur_sigma)], p=spec.blur_p),
            T.RandomSolarize(threshold=128, p=spec.solarize_p),
            T.RandomHorizontalFlip(p=spec.flip_p),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """A webdataset sample's image and label (-1 when it has no ``cls``)."""
    payload = next((sample[ext] for ext in IMAGE_EXTENSIONS if sample.get(ext)), None)
    if not payload:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image")
    image = Image.open(io.BytesIO(payload))
    image.load()
    label = int(sample["cls"]) if sample.get("cls") else -1
    return image.convert("RGB"), label


def read_shard(shard: str, skip: Collection[str] = ()) -> wds.WebDataset:
    """The samples of one shard in stored order, but for the keys in ``skip``; this process reads all of
    it (the caller splits the work), and a truncated tar or an unreadable member is skipped with a
    warning, not raised."""
    samples = wds.WebDataset(
        [shard],
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
        handler=wds.warn_and_continue,
    )
    return samples.select(lambda sample: sample["__key__"] not in skip) if skip else samples


@dataclass(frozen=True)
class Span:
    """Samples ``[first, end)`` of ``shard``, which start at ``offset`` in the epoch's order."""

    shard: str
    first: int
    end: int
    offset: int


def split_epoch(sizes: dict[str, int], seed: int, epoch: int, part: int, parts: int) -> list[Span]:
    """Part ``part`` of ``parts`` equal contiguous blocks of the epoch's sample order."""
    order = sorted(sizes)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    per_part = sum(sizes.values()) // parts
    start, stop = part * per_part, (part + 1) * per_part
    spans, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[shard])
        if lo < hi:
            spans.append(Span(shard, lo - offset, hi - offset, offset))
        offset += sizes[shard]
    return spans


class TwoViewStream(IterableDataset):
    """An endless stream of ``(view1, view2, label)`` for one rank, over epochs of WebDataset shards."""

    def __init__(
        self,
        shards: list[str],
        views: tuple[ViewSpec, ViewSpec],
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        skip_per_worker: tuple[int, ...] = (),
        worker_offset: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.sizes = shard_sizes(shards)
        self.excluded = excluded_samples(shards)  # left out of the index by a shard check
        self.transforms = (view_transform(views[0]), view_transform(views[1]))
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.skip_per_worker, self.worker_offset = skip_per_worker, worker_offset
        self.dtype = dtype
        self.bad_samples = 0

    def _worker(self) -> tuple[int, int]:
        """(reader id, readers) of this worker. A resumed loader's first batch comes from worker 0, but
        belongs to reader ``start_batch % readers``: ids are rotated by ``worker_offset`` to match."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.worker_offset) % info.num_workers, info.num_workers

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[int, dict]]:
        """This reader's ``(position in the epoch, raw sample)`` pairs, in shard order."""
        worker, workers = self._worker()
        readers = self.world_size * workers
        for span in split_epoch(self.sizes, self.seed, epoch, self.rank * workers + worker, readers):
            for index, sample in enumerate(read_shard(span.shard, self.excluded[span.shard])):
                if index >= span.end:
                    break
                if index >= span.first:
                    yield span.offset + index, sample

    def _shuffled(self, samples: Iterator[tuple[int, dict]], rng: random.Random) -> Iterator[tuple[int, dict]]:
        buffer: list[tuple[int, dict]] = []
        for item in samples:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def raw_stream(self) -> Iterator[tuple[int, int, dict]]:
        """Endless ``(epoch, position, raw sample)`` in the order this reader serves them."""
        worker, _ = self._worker()
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            served = 0
            for position, sample in self._shuffled(self._epoch_samples(epoch), rng):
                served += 1
                yield epoch, position, sample
            if not served:
                raise DataError(f"rank {self.rank} worker {worker} read no samples in epoch {epoch}")
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """``(view1, view2, label, bad samples so far)``; the count rides along so the main process can log it."""
        worker, _ = self._worker()
        to_skip = self.skip_per_worker[worker] if self.skip_per_worker else 0
        failed_in_a_row = 0
        for epoch, position, sample in self.raw_stream():
            try:
                image, label = decode_sample(sample)
            except (OSError, ValueError):
                self.bad_samples += 1
                failed_in_a_row += 1
                if failed_in_a_row > sum(self.sizes.values()):
                    raise DataError("every sample failed to decode: the shards hold no usable image") from None
                continue
            failed_in_a_row = 0
            if to_skip:  # resume: pass over the good samples already consumed, without augmenting them
                to_skip -= 1
                continue
            torch.manual_seed(hash((self.seed, epoch, position)) & 0x7FFF_FFFF_FFFF)
            view1, view2 = self.transforms[0](image).to(self.dtype), self.transforms[1](image).to(self.dtype)
            yield view1, view2, label, self.bad_samples


class TwoViewBatches:
    """Iterates ``(view1, view2, labels)`` batches and keeps what a checkpoint and the log need."""

    def __init__(self, loader: DataLoader, readers: int, start_batch: int, left_out: int = 0):
        self._batches = iter(loader)
        self.readers = readers
        self.left_out = left_out
        self.batches = start_batch  # consumed by this rank since the start of the run
        self._bad_by_reader = [0] * readers

    def __iter__(self) -> TwoViewBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view1, view2, labels, bad = next(self._batches)
        self._bad_by_reader[self.batches % self.readers] = int(bad.max())
        self.batches += 1
        return view1, view2, labels

    @property
    def bad_samples(self) -> int:
        """Samples a shard check left out of the shards, plus those this rank skipped for failing to decode."""
        return self.left_out + sum(self._bad_by_reader)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}


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
    start_batch: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TwoViewBatches:
    """Batches of ``(view1, view2, labels)`` for this rank, forever, views in ``dtype``; ``start_batch``
    resumes after that many."""
    readers = max(1, workers)
    # DataLoader hands out batches round-robin over workers: reader w made batches w, w + readers, ...
    skip = tuple(batch_size * len(range(w, start_batch, readers)) for w in range(readers))
    stream = TwoViewStream(shards, views, rank, world_size, seed, shuffle_buffer, skip, start_batch % readers, dtype)
    loader = stream_loader(stream, sum(stream.sizes.values()), batch_size, world_size, workers, pin_memory)
    return TwoViewBatches(loader, readers, start_batch, sum(map(len, stream.excluded.values())))


def stream_loader(
    stream: IterableDataset, total: int, batch_size: int, world_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """Batches of a stream whose every reader (rank x worker) reads its own part of ``total`` samples;
    a one-line :class:`DataError` when some reader would get none."""
    readers = max(1, workers)
    if total < world_size * readers:
        raise DataError(f"{total} samples cannot feed {world_size} ranks x {readers} loader workers")
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
