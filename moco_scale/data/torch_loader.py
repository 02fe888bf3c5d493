"""The webdataset two-view loader (the fallback backend): crops per image, augmentation per batch (``batch_augment``).

Sharding. Each epoch, the parts of the input (its shards, or runs of an ImageFolder's files:
:mod:`moco_scale.data.sources`) are put in an order drawn from (seed, epoch) and their samples laid end
to end; rank r takes the r-th of W equal contiguous blocks, so every sample is seen exactly once per epoch
across all ranks, except the last ``N mod W`` samples of that epoch's order (fewer than W), which are
dropped. Any world size works, including more ranks than parts. Within a rank, workers split the block
the same way, and a seeded shuffle buffer mixes samples. Each sample's augmentation is seeded by (seed,
epoch, its place in the epoch), so the views do not depend on which worker drew them.

Bad samples. A place that the manifest counts but the tar does not hold (a tar cut short) is served
as a bad sample, so which places a reader serves, and in what order, follows from (shard sizes, seed,
epoch, reader) alone. A sample that fails to decode in any way is counted in ``bad_samples`` and
skipped (:func:`decode_sample`).

Resuming. Each batch carries the position of the reader (a DataLoader worker) that made it: (epoch,
samples of it served, good or bad, bad samples so far). ``state_dict()`` holds each reader's position
after its last batch consumed, and ``state=`` resumes there exactly: whole epochs are skipped by
arithmetic, and within the epoch the shuffle buffer is replayed over place numbers, so nothing
skipped is decoded and only the shards from the one holding the oldest place still in the buffer on
are read. The cost does not grow with the epochs done. A state of another layout restarts at its global sample count
(:func:`resume_positions`).
"""

from __future__ import annotations

import io
import itertools
import random
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, blur_window
from moco_scale.data.batch_augment import BatchAugment, crop_views, draw_views
from moco_scale.data.device_views import DeviceViews, Encoded, jpeg_to_decode
from moco_scale.data.shards import IMAGE_EXTENSIONS, DataError, StreamSpec
from moco_scale.data.sources import Sample, open_source


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
    aug = spec.aug
    return T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(spec.size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
            T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_p),
            T.RandomGrayscale(p=aug.grayscale_p),
            T.RandomApply([SigmaGaussianBlur(aug.blur_sigma)], p=aug.blur_p),
            T.RandomSolarize(threshold=aug.solarize_threshold, p=aug.solarize_p),
            T.RandomHorizontalFlip(p=aug.flip_p),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


NO_PIXELS = torch.empty(0, dtype=torch.uint8)  # a sample's payload or crop that it does not carry
Position = tuple[int, int, int]  # a reader's (epoch, samples of it served so far, good or bad; bad samples so far)


def decode_sample(sample: Sample) -> tuple[Image.Image, int] | None:
    """A webdataset sample's RGB image and label (-1 without ``cls``); None for a bad sample: missing (``None``,
    a place its tar does not hold), without an image member, or failing to decode in any way (a corrupt file makes
    PIL raise OSError, ValueError, SyntaxError, struct.error, DecompressionBombError and more).

    PIL's decompression-bomb limit is kept and its warning band refused as well: an image whose header claims more
    than ``Image.MAX_IMAGE_PIXELS`` (89.5 Mpx by default) is bad before any pixel memory is allocated for it.
    """
    payload, label = _payload_and_label(sample)
    if not payload:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
                rgb = image.convert("RGB")
        return rgb, label
    except Exception:  # whatever a broken file makes the decoder raise: the sample is bad, training goes on
        return None


def open_sample(sample: Sample) -> tuple[Image.Image | Encoded, int] | None:
    """As :func:`decode_sample`, but a whole RGB or gray JPEG stays encoded, with its size
    (:func:`~moco_scale.data.device_views.jpeg_to_decode`), for the device to decode."""
    payload, label = _payload_and_label(sample)
    encoded = jpeg_to_decode(payload) if payload else None
    return decode_sample(sample) if encoded is None else (encoded, label)


def _payload_and_label(sample: Sample) -> tuple[bytes | None, int]:
    """A raw sample's image bytes (its first member with an image extension; None without one) and its label
    (-1 without ``cls``)."""
    if not sample:
        return None, -1
    payload = next((sample[ext] for ext in IMAGE_EXTENSIONS if sample.get(ext)), None)
    return payload, int(sample["cls"]) if sample.get("cls") else -1


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: SIGUSR1, SIGTERM and SIGINT, which SLURM's ``--signal`` and
    ``kill -- -PGID`` deliver to every process of the job, are the main process's to act on (it stops, saves,
    and shuts its workers down through the DataLoader)."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class Span:
    """Samples ``[first, end)`` of ``part``, which start at ``offset`` in the epoch's order."""

    part: str
    first: int
    end: int
    offset: int


def split_epoch(sizes: dict[str, int], seed: int, epoch: int, block: int, blocks: int) -> list[Span]:
    """Block ``block`` of ``blocks`` equal contiguous blocks of the epoch's sample order (parts of ``sizes``)."""
    order = sorted(sizes)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    per_block = sum(sizes.values()) // blocks
    start, stop = block * per_block, (block + 1) * per_block
    spans, offset = [], 0
    for part in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[part])
        if lo < hi:
            spans.append(Span(part, lo - offset, hi - offset, offset))
        offset += sizes[part]
    return spans


class TwoViewStream(IterableDataset):
    """An endless stream of ``(crop1, params1, crop2, params2, label, position)`` for one rank, over epochs of
    the input's parts (see :meth:`__iter__`); ``position`` is ``(reader, epoch, served, bad)`` of the reader that
    made it, after it.

    ``start`` (by reader; empty: every reader from the beginning) and ``worker_offset`` place a resumed stream
    (see :func:`resume_positions`). ``encoded``: JPEGs are left for the device to decode (see :meth:`__iter__`).
    """

    def __init__(
        self,
        inputs: list[str],
        views: tuple[ViewSpec, ViewSpec],
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        encoded: bool = False,
    ):
        self.source = open_source(inputs)
        self.encoded = encoded
        self.sizes = self.source.sizes
        self.total = sum(self.sizes.values())
        self.views = views
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.start: Sequence[Position] = ()
        self.worker_offset = 0

    def reader(self) -> tuple[int, int]:
        """(reader id, readers) of this worker. A resumed loader's first batch comes from worker 0, but
        belongs to the reader that was next: ids are rotated by ``worker_offset`` to match."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.worker_offset) % info.num_workers, info.num_workers

    def places_per_reader(self, readers: int) -> int:
        """Samples each reader (of ``readers`` per rank) serves per epoch."""
        return self.total // (self.world_size * readers)

    def _read(self, spans: list[Span], start: int) -> Iterator[tuple[int, Sample]]:
        """``(place, raw sample)`` of the spans' places from ``start`` on, in order; None for a place that its
        part does not hold (a tar cut short). Parts wholly before ``start`` are not opened."""
        for span in spans:
            if span.offset + span.end <= start:
                continue
            first = max(span.first, start - span.offset)
            samples = self.source.read(span.part, first)  # endless
            for index, sample in zip(range(first, span.end), samples, strict=False):
                yield span.offset + index, sample

    def _epoch(self, epoch: int, skip: int) -> Iterator[tuple[int, Sample]]:
        """This reader's ``(place, raw sample)`` of ``epoch`` in serving order, but for the first ``skip``.

        A reader's places are a contiguous block of the epoch's order, and the shuffle buffer's draws depend only
        on how many places it holds, so the buffer is first replayed over place numbers: nothing skipped is
        decoded, and only the parts from the one holding the oldest place still in the buffer on are read.
        """
        worker, workers = self.reader()
        spans = split_epoch(self.sizes, self.seed, epoch, self.rank * workers + worker, self.world_size * workers)
        if not spans:
            raise DataError(f"rank {self.rank} worker {worker} has no samples in epoch {epoch}")
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
        place, end = spans[0].offset + spans[0].first, spans[-1].offset + spans[-1].end
        buffer: list[int] = []
        served = 0
        while served < skip and place < end:
            buffer.append(place)
            place += 1
            if len(buffer) >= self.shuffle_buffer:
                buffer.pop(rng.randrange(len(buffer)))
                served += 1
        flushed = served < skip  # into the shuffled remainder served at the end of the epoch
        if flushed:
            rng.shuffle(buffer)
            del buffer[: skip - served]
        wanted, kept = set(buffer), {}
        samples = self._read(spans, min(buffer, default=place))
        for item in samples:
            if item[0] >= place:
                samples = itertools.chain([item], samples)
                break
            if item[0] in wanted:
                kept[item[0]] = item[1]
        refilled = [(p, kept[p]) for p in buffer]
        yield from refilled if flushed else self._shuffled(samples, rng, refilled)

    def _shuffled(
        self, samples: Iterator[tuple[int, Sample]], rng: random.Random, buffer: list[tuple[int, Sample]]
    ) -> Iterator[tuple[int, Sample]]:
        for item in samples:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def raw_stream(self, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, Sample]]:
        """Endless ``(epoch, place, raw sample)`` in the order this reader serves them, from ``start``:
        ``(epoch, samples of it already served)``. A raw sample is None where its tar holds no sample."""
        epoch, skip = start
        while True:
            for place, sample in self._epoch(epoch, skip):
                yield epoch, place, sample
            epoch, skip = epoch + 1, 0

    def decoded(
        self, start: Position = (0, 0, 0), decode: Callable[[Sample], tuple | None] | None = None
    ) -> Iterator[tuple[Image.Image | Encoded, int, Position]]:
        """``(image, label, position after it)`` of this reader's samples that ``decode`` (default
        :func:`decode_sample`) takes, from ``start``; the bad ones are counted in the position and skipped. torch's
        RNG is seeded for each sample from (seed, epoch, place), so its augmentation does not depend on which
        worker drew it."""
        decode = decode or decode_sample
        epoch, served, bad = start
        failed_in_a_row = 0
        for sample_epoch, place, sample in self.raw_stream((epoch, served)):
            served = served + 1 if sample_epoch == epoch else 1
            epoch = sample_epoch
            image_label = decode(sample)
            if image_label is None:
                bad += 1
                failed_in_a_row += 1
                if failed_in_a_row > self.total:
                    raise DataError("every sample failed to decode: the input holds no usable image")
                continue
            failed_in_a_row = 0
            # the CPU generator only: torch.manual_seed also queues a seeding of every lazy device (CUDA, XPU,
            # MTIA) with a formatted stack, 0.7 ms a sample
            torch.default_generator.manual_seed(hash((self.seed, epoch, place)) & 0x7FFF_FFFF_FFFF)
            yield *image_label, (epoch, served, bad)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Per sample: each view's uint8 crop and random parameters (``batch_augment.crop_views``), the label and
        the position; :class:`TwoViewCollate` makes the views of a batch of them. With ``encoded``, a JPEG comes
        encoded instead, with both views' crop boxes, for the device to decode and crop
        (:mod:`moco_scale.data.device_views`), and its crops are empty: ``(payload, boxes, crop1, params1, crop2,
        params2, label, position)``."""
        reader, _ = self.reader()
        start = self.start[reader] if self.start else (0, 0, 0)
        if not self.encoded:
            for image, label, position in self.decoded(start):
                (crop1, params1), (crop2, params2) = crop_views(image, self.views)
                yield crop1, params1, crop2, params2, label, torch.tensor([reader, *position])
            return
        for item, label, position in self.decoded(start, open_sample):
            if isinstance(item, Image.Image):
                (crop1, params1), (crop2, params2) = crop_views(item, self.views)
                payload, boxes = NO_PIXELS, torch.zeros(2, 4, dtype=torch.int64)
            else:
                (box1, params1), (box2, params2) = draw_views(*item[1], self.views)
                payload, boxes = torch.frombuffer(bytearray(item[0]), dtype=torch.uint8), torch.tensor([box1, box2])
                crop1 = crop2 = NO_PIXELS
            yield payload, boxes, crop1, params1, crop2, params2, label, torch.tensor([reader, *position])


class TwoViewCollate:
    """A DataLoader's ``collate_fn`` (run in its worker): a batch of :class:`TwoViewStream` samples to
    ``(view1, view2, labels, positions)``, the views augmented as a batch (``batch_augment.BatchAugment``)."""

    def __init__(self, views: tuple[ViewSpec, ViewSpec], dtype: torch.dtype = torch.float32):
        self.augment = (BatchAugment(views[0], dtype), BatchAugment(views[1], dtype))

    def __call__(self, samples: list[tuple]) -> tuple[torch.Tensor, ...]:
        crop1, params1, crop2, params2, labels, positions = zip(*samples, strict=True)
        view1 = self.augment[0](torch.stack(crop1), torch.stack(params1))
        view2 = self.augment[1](torch.stack(crop2), torch.stack(params2))
        return view1, view2, torch.tensor(labels), torch.stack(positions)


class EncodedCollate:
    """A DataLoader's ``collate_fn`` for an ``encoded`` :class:`TwoViewStream`: payloads and crops as lists (their
    sizes differ), boxes, parameters, labels and positions stacked; :class:`DeviceViews` finishes the views."""

    def __call__(self, samples: list[tuple]) -> tuple:
        payloads, boxes, crop1, params1, crop2, params2, labels, positions = zip(*samples, strict=True)
        params1, params2 = torch.stack(params1), torch.stack(params2)
        boxes, labels, positions = torch.stack(boxes), torch.tensor(labels), torch.stack(positions)
        return list(payloads), boxes, list(crop1), params1, list(crop2), params2, labels, positions


class StreamBatches:
    """Iterates a stream loader's batches without their positions, and keeps what a checkpoint and the log need:
    each reader's position after the last of its batches consumed here, and the bad samples. ``finish``, when
    given, makes the views of each batch in this process (:class:`DeviceViews`)."""

    def __init__(
        self,
        loader: DataLoader,
        positions: Sequence[Position],
        batches: int,
        per_reader: int,
        world_size: int,
        left_out: int = 0,
        bad_before: int = 0,
        finish: DeviceViews | None = None,
    ):
        self._batches = iter(loader)
        self.finish = finish
        self.positions = [list(p) for p in positions]  # by reader
        self.batches = batches  # consumed by this rank (since the last restart at a global sample count)
        self.per_reader, self.world_size = per_reader, world_size
        self.left_out, self.bad_before = left_out, bad_before

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        *batch, positions = next(self._batches)
        reader, epoch, served, bad = positions[-1].tolist()
        self.positions[reader] = [epoch, served, bad]
        self.batches += 1
        return self.finish(batch) if self.finish else tuple(batch)

    @property
    def bad_samples(self) -> int:
        """Samples a shard check left out of the shards, plus those this rank skipped for failing to decode."""
        return self.left_out + self.decode_failures

    @property
    def decode_failures(self) -> int:
        """Samples this rank skipped for failing to decode, those before a restart at a global sample count included."""
        dropped = self.finish.dropped if self.finish else 0  # no decoder took them on the device
        return self.bad_before + sum(bad for _, _, bad in self.positions) + dropped

    def state_dict(self) -> dict[str, int | list[list[int]]]:
        """Plain ints: ``readers`` (each reader's position), ``batches`` (which reader is next), and the global
        sample count that any layout or backend can restart from (see :func:`resume_positions`)."""
        consumed = sum(epoch * self.per_reader + served for epoch, served, _ in self.positions)
        return {
            "readers": [list(p) for p in self.positions],
            "batches": self.batches,
            "samples": consumed * self.world_size,  # this rank's readers stand for all ranks'
            "epoch_samples": self.per_reader * len(self.positions) * self.world_size,
            "bad_samples": self.decode_failures,
        }


def resume_positions(
    state: dict | None, readers: int, per_reader: int, batch_size: int, world_size: int
) -> tuple[list[Position], int, int]:
    """Each reader's start position, the batches consumed (their count tells which reader serves next) and the bad
    samples counted before the positions' own, from a loader ``state``.

    A state with a position for each of ``readers`` continues exactly (the other layout fields, batch size, seed and
    shuffle buffer, are the caller's to compare: see :func:`moco_scale.data.loader.remap_state`). Any other state
    (another world size or worker count, a DALI state, or a remapped one) restarts at its global sample count:
    the same epoch, and the same fraction of it split evenly over the readers, so a few samples of that epoch
    may be seen twice or not at all. A state from before positions were saved (``{"batches": n}``) counts
    ``n`` batches of every rank.
    """
    if not state:
        return [(0, 0, 0)] * readers, 0, 0
    if len(state.get("readers", ())) == readers:
        positions = [(epoch, served, bad) for epoch, served, bad in state["readers"]]
        return positions, state["batches"], state["bad_samples"] - sum(bad for _, _, bad in positions)
    epoch_samples = state.get("epoch_samples") or per_reader * readers * world_size
    epoch, into = divmod(state.get("samples", state.get("batches", 0) * batch_size * world_size), epoch_samples)
    return [(epoch, into * per_reader // epoch_samples, 0)] * readers, 0, state.get("bad_samples", 0)


def two_view_loader(
    stream: StreamSpec,
    workers: int = 0,
    *,
    pin_memory: bool = False,
    state: dict | None = None,
    dtype: torch.dtype = torch.float32,
    augment_on: torch.device | None = None,
) -> StreamBatches:
    """Batches of ``(view1, view2, labels)`` for this rank, forever, views in ``dtype``, made by ``workers``
    DataLoader processes (0: in this one); ``state`` (a ``state_dict()``) resumes (see :func:`resume_positions`).
    ``augment_on`` (a GPU without DALI): JPEGs are decoded, cropped and augmented on that device, in this process
    (:mod:`moco_scale.data.device_views`); the workers only read, draw and crop what the device cannot decode."""
    readers, batch_size, world_size = max(1, workers), stream.batch_size, stream.world_size
    encoded = augment_on is not None
    dataset = TwoViewStream(
        stream.inputs, stream.views, stream.rank, world_size, stream.seed, stream.shuffle_buffer, encoded
    )
    per_reader = dataset.places_per_reader(readers)
    positions, batches, bad_before = resume_positions(state, readers, per_reader, batch_size, world_size)
    # DataLoader hands out batches round-robin over workers: reader w made batches w, w + readers, ...
    dataset.start, dataset.worker_offset = positions, batches % readers
    collate = EncodedCollate() if encoded else TwoViewCollate(stream.views, dtype)
    loader = stream_loader(dataset, dataset.total, batch_size, world_size, workers, pin_memory, collate)
    finish = DeviceViews(stream.views, augment_on, dtype) if encoded else None
    left_out = dataset.source.left_out
    return StreamBatches(loader, positions, batches, per_reader, world_size, left_out, bad_before, finish)


def stream_loader(
    stream: IterableDataset,
    total: int,
    batch_size: int,
    world_size: int,
    workers: int,
    pin_memory: bool,
    collate: Callable[[list], tuple] | None = None,
) -> DataLoader:
    """Batches of a stream whose every reader (rank x worker) reads its own part of ``total`` samples, put
    together by ``collate`` (torch's default when None) in the worker; a one-line :class:`DataError` when some
    reader would get none."""
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
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate,
    )
