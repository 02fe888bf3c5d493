"""The NVIDIA DALI two-view loader: the same views and sharding as :mod:`moco_scale.data.torch_loader`, faster.

Each image is decoded once (on the GPU with ``device_id`` set, else on the CPU) and augmented twice,
following the two :class:`~moco_scale.data.augment.ViewSpec` as torchvision applies them, in uint8
between steps. Where DALI differs from torchvision: colour jitter uses a fixed order (brightness,
contrast, saturation, hue) instead of a random one, and DALI's hue shift and saturation are a
linear rotation and scaling of the chroma in YIQ space rather than exact HSV operations.

Every rank reads a disjoint ``1 / world_size`` of the samples each epoch. From shards
(``fn.readers.webdataset``), the order of the tars is redrawn each epoch from ``seed`` (the same on all
ranks) and samples are shuffled in a buffer; from an ImageFolder list (``fn.readers.file``), the whole
list is reshuffled each epoch from ``seed``. DALI stops the whole pipeline on an image it cannot decode,
so it streams only inputs whose images were checked with its decoder (see
:mod:`moco_scale.data.decode_check`): the shards' index files, or the checked list
(:mod:`moco_scale.data.image_folder`), leave out the samples that failed, which ``bad_samples`` counts.

Resuming. ``state_dict()`` is DALI's own pipeline checkpoint (reader position and every random op's
state), which continues exactly, plus the global sample count. DALI cannot be placed anywhere else, so
a state without its checkpoint (the torch loader's, or another layout's) starts a new pass of DALI's
reader and only the count goes on from the saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec
from moco_scale.data.image_folder import FolderSource
from moco_scale.data.shards import IMAGE_EXTENSIONS, StreamSpec, usable_shards
from moco_scale.data.sources import Source, open_source

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.tensors import TensorListCPU, TensorListGPU
    from nvidia.dali.types import DALIDataType

READER = "reader"
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def solarized(threshold: float) -> list[float]:
    """The lookup table of a solarization: levels at or above ``threshold`` inverted, as torchvision and PIL do."""
    return [float(v if v < threshold else 255 - v) for v in range(256)]


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


def _uniform(low: float, high: float) -> float | DataNode:
    """A per-sample draw from U(low, high), or the constant when the range is empty."""
    from nvidia.dali import fn

    return low if low == high else fn.random.uniform(range=[low, high])


def _factor(strength: float) -> float | DataNode:
    """torchvision's ColorJitter factor: U(max(0, 1 - strength), 1 + strength)."""
    return _uniform(max(0.0, 1.0 - strength), 1.0 + strength)


def _augment(image: DataNode, spec: ViewSpec, dtype: DALIDataType, layout: str) -> DataNode:
    """One view of decoded HWC uint8 images; ``if`` on a DataNode is a per-sample branch (DALI conditionals)."""
    from nvidia.dali import fn, types

    aug = spec.aug
    x = fn.random_resized_crop(
        image,
        size=[spec.size, spec.size],
        random_area=list(aug.crop_scale),
        random_aspect_ratio=list(aug.crop_ratio),
        antialias=True,
    )
    brightness, contrast, saturation, hue = aug.jitter
    if aug.jitter_p > 0 and fn.random.coin_flip(probability=aug.jitter_p, dtype=types.BOOL):
        if brightness > 0 or contrast > 0:
            # torchvision's contrast blends with the image's mean gray, not with mid-gray: pass it as the centre
            # (argument inputs live on the CPU: .cpu() is a no-op there and a per-sample scalar copy on the GPU)
            means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
            gray = sum(means[i] * w for i, w in enumerate(GRAY_WEIGHTS))
            x = fn.brightness_contrast(
                x, brightness=_factor(brightness), contrast=_factor(contrast), contrast_center=gray.cpu()
            )
        if saturation > 0 or hue > 0:
            # torchvision's hue factor h shifts hue by U(-h, h) of a full turn; DALI's hue is in degrees: 360 h
            x = fn.hsv(x, saturation=_factor(saturation), hue=_uniform(-360.0 * hue, 360.0 * hue))
    if aug.grayscale_p > 0 and fn.random.coin_flip(probability=aug.grayscale_p, dtype=types.BOOL):
        gray = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        x = fn.color_space_conversion(gray, image_type=types.GRAY, output_type=types.RGB)
    if aug.blur_p > 0 and fn.random.coin_flip(probability=aug.blur_p, dtype=types.BOOL):
        # window 2*ceil(3 sigma)+1 taps from sigma, like fb/moco's PIL radius blur; fixed 23 taps cost ~3x on CPU
        x = fn.gaussian_blur(x, sigma=_uniform(*aug.blur_sigma))
    if aug.solarize_p > 0 and fn.random.coin_flip(probability=aug.solarize_p, dtype=types.BOOL):
        x = fn.lookup_table(x, keys=list(range(256)), values=solarized(aug.solarize_threshold), dtype=types.UINT8)
    return fn.crop_mirror_normalize(
        x,
        mirror=fn.random.coin_flip(probability=aug.flip_p),
        mean=[255.0 * m for m in IMAGENET_MEAN],
        std=[255.0 * s for s in IMAGENET_STD],
        dtype=dtype,
        output_layout=layout,
    )


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
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    checkpoint: str | None = None,
    source: Source | None = None,
) -> Pipeline:
    """A DALI pipeline of ``(view1, view2, cls)`` batches for this rank; ``cls`` holds the raw text bytes of the
    shards' ``cls`` members, or a folder's int32 labels.

    Views come out in ``dtype`` when DALI has it (float32, float16; otherwise float32), CHW, or HWC
    with ``channels_last``; on the GPU ``device_id`` when it is set, else on the CPU. ``source``: the stream's
    input, opened already (default: opened here).
    """
    from nvidia.dali import fn, pipeline_def, types

    views, rank, world_size, seed = stream.views, stream.rank, stream.world_size, stream.seed
    source = source or open_source(stream.inputs)
    out_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
    layout = "HWC" if channels_last else "CHW"

    @pipeline_def(enable_conditionals=True)
    def two_views() -> tuple[DataNode, DataNode, DataNode]:
        jpeg, cls = _read(source, stream)
        image = fn.decoders.image(jpeg, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return _augment(image, views[0], out_dtype, layout), _augment(image, views[1], out_dtype, layout), cls

    return two_views(
        batch_size=stream.batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed * world_size + rank,
        enable_checkpointing=True,  # reader position and every random op's state: exact resume
        checkpoint=checkpoint,
    )


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
    ``state`` (a ``state_dict()``) resumes: see the module docstring.
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
            stream,
            source=source,
            device_id=device_id,
            num_threads=num_threads,
            dtype=dtype,
            channels_last=channels_last,
            checkpoint=state.get("dali"),
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
        self.dtype, self.channels_last = dtype, channels_last

    def __iter__(self) -> DaliTwoViewLoader:
        return self

    def state_dict(self) -> dict[str, bytes | int]:
        """DALI's own checkpoint of the pipeline (``dali``), and the global sample count that any backend or layout
        can restart from (``samples``, ``epoch_samples``, ``bad_samples``)."""
        return {
            "dali": self.pipe.checkpoint(),
            "samples": self.samples,
            "epoch_samples": self.epoch_samples,
            "bad_samples": self.decode_failures,
        }

    def _to_torch(self, views: TensorListCPU | TensorListGPU) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = views.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last strides
        return out.to(self.dtype)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view1, view2, cls = self.pipe.run()
        self.samples += self.global_batch
        return self._to_torch(view1), self._to_torch(view2), cls_labels(cls)
