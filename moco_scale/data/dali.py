"""The NVIDIA DALI two-view loader: the same views and sharding as :mod:`moco_scale.data.torch_loader`, faster.

Each image is decoded once (on the GPU with ``device_id`` set, else on the CPU) and cropped twice by DALI:
each view's random-resized crop (antialiased) goes to uint8 at its size, flipped when drawn, and DALI draws
the view's random parameters beside it. The rest of the augmentation (colour jitter in each sample's own
order, grayscale, blur, solarize, normalisation) is the torch loader's own batched code
(:class:`~moco_scale.data.batch_augment.BatchAugment`), run by a thread of the loader on the views' device:
one augmentation path for both loaders, and faster on the CPU than DALI's own colour and blur operators
(``benchmarks/RESULTS.md``). As in the torch loader, the hue turns the chroma plane of YIQ.

Every rank reads a disjoint ``1 / world_size`` of the samples each epoch. From shards
(``fn.readers.webdataset``), the order of the tars is redrawn each epoch from ``seed`` (the same on all
ranks) and samples are shuffled in a buffer; from an ImageFolder list (``fn.readers.file``), the whole
list is reshuffled each epoch from ``seed``. DALI stops the whole pipeline on an image it cannot decode,
so it streams only inputs whose images were checked with its decoder (see
:mod:`moco_scale.data.decode_check`): the shards' index files, or the checked list
(:mod:`moco_scale.data.image_folder`), leave out the samples that failed, which ``bad_samples`` counts.

Resuming. ``state_dict()`` is DALI's own pipeline checkpoint (reader position and every random op's
state, the drawn parameters' too) after the last batch consumed, which continues exactly, plus the global
sample count. DALI cannot be placed anywhere else, so
a state without its checkpoint (the torch loader's, or another layout's) starts a new pass of DALI's
reader and only the count goes on from the saved one.
"""

from __future__ import annotations

import atexit
import queue
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moco_scale.data.augment import ViewSpec
from moco_scale.data.batch_augment import FIELDS, PERMUTATIONS, BatchAugment
from moco_scale.data.image_folder import FolderSource
from moco_scale.data.shards import IMAGE_EXTENSIONS, StreamSpec, usable_shards
from moco_scale.data.sources import Source, open_source

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.tensors import TensorListCPU, TensorListGPU

READER = "reader"
AHEAD = 2  # batches the loader's thread finishes ahead of the consumer


def dali_available() -> bool:
    """Whether DALI and its PyTorch plugin import."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def index_paths(shards: list[str]) -> list[str] | None:
    """The ``X.idx`` beside each ``X.tar`` when every shard has one; else None (DALI then indexes the tars)."""
    paths = [str(Path(s).with_suffix(".idx")) for s in shards]
    return paths if all(Path(p).is_file() for p in paths) else None


def _draw(low: float, high: float) -> DataNode:
    """A per-sample (1,) float draw from U(low, high) (the constant ``low`` when the range is empty)."""
    from nvidia.dali import fn

    return fn.random.uniform(range=[low, high], shape=[1]) if low < high else fn.random.uniform(values=[low], shape=[1])


def _coin(probability: float) -> DataNode:
    """A per-sample (1,) float 0/1 draw, 1 with ``probability``."""
    from nvidia.dali import fn, types

    return fn.cast(fn.random.coin_flip(probability=probability, shape=[1]), dtype=types.FLOAT)


def _view(image: DataNode, spec: ViewSpec) -> tuple[DataNode, DataNode]:
    """One view's uint8 HWC crop (random-resized, antialiased, flipped when drawn) and its random parameters, a
    float vector laid out as ``batch_augment.FIELDS``, drawn as ``batch_augment.draw_params`` draws them."""
    from nvidia.dali import fn, types

    aug = spec.aug
    flip = fn.random.coin_flip(probability=aug.flip_p, dtype=types.INT32)
    crop = fn.random_resized_crop(
        image,
        size=[spec.size, spec.size],
        random_area=list(aug.crop_scale),
        random_aspect_ratio=list(aug.crop_ratio),
        antialias=True,
    )
    brightness, contrast, saturation = (_draw(max(0.0, 1 - strength), 1 + strength) for strength in aug.jitter[:3])
    drawn = {
        "jitter": _coin(aug.jitter_p),
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "hue": _draw(-aug.jitter[3], aug.jitter[3]),
        "order": fn.random.uniform(values=[float(k) for k in range(len(PERMUTATIONS))], shape=[1]),
        "gray": _coin(aug.grayscale_p),
        "blur": _coin(aug.blur_p),
        "sigma": _draw(*aug.blur_sigma),
        "solarize": _coin(aug.solarize_p),
        "flip": fn.cast(fn.reshape(flip, shape=[1]), dtype=types.FLOAT),
    }
    return fn.flip(crop, horizontal=flip), fn.cat(*(drawn[name] for name in FIELDS))


def _read(source: Source, stream: StreamSpec) -> tuple[DataNode, DataNode]:
    """This rank's encoded images and labels: a folder's checked list through DALI's file reader, shards through
    its webdataset reader (see the module docstring)."""
    from nvidia.dali import fn

    split = {"shard_id": stream.rank, "num_shards": stream.world_size, "name": READER}
    if isinstance(source, FolderSource):
        index = source.index
        reshuffle = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": stream.seed}
        return fn.readers.file(files=index.paths, labels=index.labels, **reshuffle, **split)
    shards = usable_shards(stream.inputs)
    return fn.readers.webdataset(
        paths=shards,
        index_paths=index_paths(shards),
        ext=[";".join(IMAGE_EXTENSIONS), "cls"],
        missing_component_behavior="empty",  # no cls: label -1
        random_shuffle=True,
        initial_fill=stream.shuffle_buffer,
        shuffle_after_epoch=True,
        shuffle_after_epoch_seed=stream.seed,
        **split,
    )


def build_two_view_pipeline(
    stream: StreamSpec,
    *,
    device_id: int | None,
    num_threads: int,
    checkpoint: str | None = None,
    source: Source | None = None,
) -> Pipeline:
    """A DALI pipeline of ``(crop1, params1, crop2, params2, cls)`` batches for this rank: each view's uint8 HWC
    crops and random parameters (:func:`_view`), and ``cls``, the raw text bytes of the shards' ``cls`` members
    or a folder's int32 labels. On the GPU ``device_id`` when it is set, else on the CPU. ``source``: the
    stream's input, opened already (default: opened here). :func:`finish_batch` makes the views.
    """
    from nvidia.dali import fn, pipeline_def, types

    views, rank, world_size, seed = stream.views, stream.rank, stream.world_size, stream.seed
    source = source or open_source(stream.inputs)

    @pipeline_def
    def two_views() -> tuple[DataNode, ...]:
        jpeg, cls = _read(source, stream)
        image = fn.decoders.image(jpeg, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return (*_view(image, views[0]), *_view(image, views[1]), cls)

    return two_views(
        batch_size=stream.batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed * world_size + rank,
        enable_checkpointing=True,  # reader position and every random op's state: exact resume
        checkpoint=checkpoint,
    )


def to_torch(batch: TensorListCPU | TensorListGPU, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on ``device`` (the batch's own: the CPU, or its GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = batch.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def finish_view(
    crops: TensorListCPU | TensorListGPU,
    params: TensorListCPU,
    augment: BatchAugment,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """One view's batch from its DALI crops (uint8 NHWC) and parameters, augmented on ``device`` (the torch
    loader's ``BatchAugment``), channels-last when asked."""
    view = augment(to_torch(crops, device).permute(0, 3, 1, 2), to_torch(params, torch.device("cpu")))
    return view.contiguous(memory_format=torch.channels_last) if channels_last else view


def finish_batch(
    outputs: tuple,
    augment: tuple[BatchAugment, BatchAugment],
    device: torch.device,
    channels_last: bool = False,
    helper: Executor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(view1, view2, labels)`` of a pipeline's outputs (:func:`finish_view`; labels int64 on the CPU); the
    second view on ``helper`` while this thread makes the first, when one is given."""
    crop1, params1, crop2, params2, cls = outputs
    if helper is None:
        view2 = finish_view(crop2, params2, augment[1], device, channels_last)
    else:
        second = helper.submit(finish_view, crop2, params2, augment[1], device, channels_last)
    view1 = finish_view(crop1, params1, augment[0], device, channels_last)
    return view1, view2 if helper is None else second.result(), cls_labels(cls)


def cls_labels(cls: TensorListCPU) -> torch.Tensor:
    """int64 labels from a batch of ``cls`` texts (-1 where a sample has none), or of a file reader's labels."""
    from nvidia.dali import types

    if cls.dtype != types.UINT8:
        return torch.tensor([cls.at(i).item() for i in range(len(cls))], dtype=torch.int64)
    texts = [cls.at(i).tobytes() for i in range(len(cls))]
    return torch.tensor([int(t) if t.strip() else -1 for t in texts], dtype=torch.int64)


class DaliTwoViewLoader:
    """Batches of ``(view1, view2, labels)`` for this rank, forever, like ``two_view_loader``'s.

    Views are ``(B, 3, size, size)`` in ``dtype`` (channels_last memory format when asked), on the
    GPU ``device_id`` when it is set; labels are int64 on the CPU. The DALI reader wraps around at
    each epoch end by itself, so the stream never stops; ``samples_per_epoch`` is this rank's share.
    A thread finishes the views (:func:`finish_batch`) :data:`AHEAD` batches ahead of the consumer, each
    with DALI's checkpoint after it. ``state`` (a ``state_dict()``) resumes: see the module docstring.
    """

    def __init__(
        self,
        stream: StreamSpec,
        *,
        device_id: int | None = None,
        num_threads: int = 4,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        state: dict | None = None,
    ):
        state = state or {}
        source = open_source(stream.inputs)
        self.pipe = build_two_view_pipeline(
            stream, source=source, device_id=device_id, num_threads=num_threads, checkpoint=state.get("dali")
        )
        self.pipe.build()
        self.epoch_samples = total = self.pipe.reader_meta(READER)["epoch_size"]
        rank, world_size = stream.rank, stream.world_size
        self.samples_per_epoch = total * (rank + 1) // world_size - total * rank // world_size
        self.samples = state.get("samples", 0)  # consumed by all ranks together
        self.global_batch = stream.batch_size * world_size
        self.decode_failures = state.get("bad_samples", 0)  # counted by the torch loader before a switch
        self.bad_samples = source.left_out + self.decode_failures
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        augment = (BatchAugment(stream.views[0], dtype), BatchAugment(stream.views[1], dtype))
        self._checkpoint = self.pipe.checkpoint()  # after the last batch consumed
        self._ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        finisher = (self.pipe, augment, self.device, channels_last, self._ready, self._stop)
        self._thread = threading.Thread(target=_finish_ahead, args=finisher, daemon=True, name="dali-views")
        self._thread.start()
        # at exit, before the interpreter goes: a daemon thread still inside DALI then could crash the process
        atexit.register(_stop_and_join, self._stop, self._thread)

    def __iter__(self) -> DaliTwoViewLoader:
        return self

    def state_dict(self) -> dict[str, bytes | int]:
        """DALI's own checkpoint of the pipeline after the last batch consumed (``dali``), and the global sample
        count that any backend or layout can restart from (``samples``, ``epoch_samples``, ``bad_samples``)."""
        return {
            "dali": self._checkpoint,
            "samples": self.samples,
            "epoch_samples": self.epoch_samples,
            "bad_samples": self.decode_failures,
        }

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, checkpoint = self._ready.get()
        if isinstance(batch, BaseException):
            raise batch
        self._checkpoint = checkpoint
        self.samples += self.global_batch
        return batch

    def close(self) -> None:
        """Stop the finishing thread (it holds the pipeline); the loader gives no batch after this."""
        _stop_and_join(self._stop, self._thread)

    def __del__(self) -> None:
        self._stop.set()


def _finish_ahead(
    pipe: Pipeline,
    augment: tuple[BatchAugment, BatchAugment],
    device: torch.device,
    channels_last: bool,
    ready: queue.Queue,
    stop: threading.Event,
) -> None:
    """The loader's thread: run the pipeline, finish each batch's views, and queue them with DALI's checkpoint
    after them, until ``stop``; an exception is queued for the consumer to raise."""
    on_device = device.type == "cuda"
    if on_device:
        torch.cuda.set_device(device)
    # On the CPU the two views are finished side by side, each thread with one torch thread (OpenMP's count is per
    # thread): the finishing, not DALI, bounded the loader with one (measured: benchmarks/RESULTS.md).
    _one_torch_thread()
    helper = None if on_device else ThreadPoolExecutor(1, "dali-views-2", initializer=_one_torch_thread)
    while not stop.is_set():
        try:
            outputs = pipe.run()
            item = finish_batch(outputs, augment, device, channels_last, helper), pipe.checkpoint()
        except Exception as error:  # raised in the consumer, where it can stop training
            item = error, None
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item[0], BaseException):
            break
    if helper is not None:
        helper.shutdown()


def _stop_and_join(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join()


def _one_torch_thread() -> None:
    torch.set_num_threads(1)
