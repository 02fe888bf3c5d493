"""The DALI two-view pipeline on real JPEG shards, in CPU mode (GPU checks run where there is one)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from nvidia.dali.tensors import TensorListCPU

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, ViewSpec, moco_views
from moco_scale.data.batch_augment import COLUMN, BatchAugment
from moco_scale.data.dali import (
    DaliTwoViewLoader,
    build_two_view_pipeline,
    cls_labels,
    dali_available,
    finish_batch,
    index_paths,
)
from moco_scale.data.shards import StreamSpec, list_shards, write_shards
from moco_scale.data.torch_loader import two_view_loader

LUMA = (0.299, 0.587, 0.114)
# every view equals its decoded image, up to an optional flip: no crop, colour change or blur
PLAIN = ViewSpec(32, Augmentation(crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0))


def _pixels(views: torch.Tensor | TensorListCPU) -> torch.Tensor:
    """Un-normalised 0-255 pixels of a batch of DALI CHW views, or of torch views."""
    x = views if isinstance(views, torch.Tensor) else torch.from_numpy(np.array(views.as_tensor()))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() * std + mean) * 255


def _keys(output: TensorListCPU) -> list[str]:
    """The sample keys of a batch, from the source info of a pipeline output (``archive:offset:key.ext``): ``cls``
    (empty where a sample has none), or an unflipped crop (``fn.flip`` drops the info of the samples it flips)."""
    return [output[i].source_info().rsplit(":", 1)[1].split(".")[0] for i in range(len(output))]


def _tar_members(shards: list[str]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def _decoded(shards: list[str], keys: list[str]) -> torch.Tensor:
    members = _tar_members(shards)
    images = [np.asarray(Image.open(io.BytesIO(members[f"{k}.jpg"])).convert("RGB")) for k in keys]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def color_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """16 smooth, saturated 32 px colour JPEGs (the demo digits are gray)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((32, 32), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=95)
        samples.append((f"color{i:02d}", buffer.getvalue(), i % 3))
    folder = tmp_path_factory.mktemp("color")
    return [str(p) for p in write_shards(samples, folder, samples_per_shard=8)]


def _run(shards: list[str], views: tuple[ViewSpec, ViewSpec], batch_size: int = 8) -> tuple:
    """One CPU batch: ``(view1, view2, labels)`` as the loader finishes it, and the pipeline's raw outputs
    ``(crop1, params1, crop2, params2, cls)``."""
    pipe = build_two_view_pipeline(StreamSpec(shards, views, batch_size), device_id=None, num_threads=1)
    pipe.build()
    outputs = pipe.run()
    augment = (BatchAugment(views[0]), BatchAugment(views[1]))
    return *finish_batch(outputs, augment, torch.device("cpu")), outputs


def test_dali_is_available() -> None:
    assert dali_available()


def test_views_have_the_configured_shape_and_are_normalised(demo_shards: dict[str, Path]) -> None:
    shards, views = list_shards(str(demo_shards["val"])), moco_views("v2", 24)
    loader = DaliTwoViewLoader(StreamSpec(shards, views, 16), num_threads=2)
    assert loader.samples_per_epoch == 300
    view1, view2, labels = next(loader)
    fallback = next(iter(two_view_loader(StreamSpec(shards, views, 16, shuffle_buffer=16))))
    assert [(t.shape, t.dtype) for t in (view1, view2, labels)] == [(t.shape, t.dtype) for t in fallback]
    assert view1.shape == view2.shape == (16, 3, 24, 24) and view1.dtype == torch.float32 and view1.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (16,) and labels.min() >= 0 and labels.max() <= 9
    assert (view1 - view2).abs().mean() > 0.1
    assert -3 < view1.mean() < 3 and 0.3 < view1.std() < 3
    assert _pixels(view1).min() > -0.01 and _pixels(view1).max() < 255.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channels_last_and_dtype_keep_the_views(demo_shards: dict[str, Path], dtype: torch.dtype) -> None:
    shards, views = list_shards(str(demo_shards["val"])), moco_views("v3", 16)
    reference = DaliTwoViewLoader(StreamSpec(shards, views, 8, seed=5), num_threads=1)
    loader = DaliTwoViewLoader(StreamSpec(shards, views, 8, seed=5), num_threads=1, dtype=dtype, channels_last=True)
    expected, got = next(reference), next(loader)
    for want, view in zip(expected[:2], got[:2], strict=True):
        assert view.shape == want.shape and view.dtype == dtype
        assert view.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(view.float(), want, atol=0.02, rtol=0.01)
    assert torch.equal(got[2], expected[2])


def test_labels_are_the_samples_cls(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["val"]))
    members = _tar_members(shards)
    pipe = build_two_view_pipeline(StreamSpec(shards, moco_views("v2", 16), 32), device_id=None, num_threads=2)
    pipe.build()
    for _ in range(2):
        *_, cls = pipe.run()
        keys = _keys(cls)
        assert cls_labels(cls).tolist() == [int(members[f"{k}.cls"]) for k in keys]


def test_samples_without_cls_get_label_minus_one(tmp_path: Path, demo_shards: dict[str, Path]) -> None:
    jpeg = _tar_members(list_shards(str(demo_shards["val"])))["digit01500.jpg"]
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for i, cls in enumerate([b"7", None, b"12", None]):
            for name, payload in [(f"s{i}.jpg", jpeg), (f"s{i}.cls", cls)]:
                if payload is not None:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    *_, outputs = _run([str(tmp_path / "mixed.tar")], (PLAIN, PLAIN), batch_size=4)
    labels = dict(zip(_keys(outputs[0]), cls_labels(outputs[-1]).tolist(), strict=True))  # PLAIN: no flip
    assert labels == {"s0": 7, "s1": -1, "s2": 12, "s3": -1}


def test_two_ranks_split_each_epoch_without_overlap(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["train"]))
    everything = {name.split(".")[0] for name in _tar_members(shards)}
    epochs: list[list[list[str]]] = []
    for rank in range(2):
        stream = StreamSpec(shards, moco_views("v2", 8), 100, rank, 2, seed=3)
        pipe = build_two_view_pipeline(stream, device_id=None, num_threads=2)
        pipe.build()
        loader = DaliTwoViewLoader(stream, num_threads=1)
        n = loader.samples_per_epoch
        loader.close()
        keys: list[str] = []
        while len(keys) < 2 * n:
            keys += _keys(pipe.run()[-1])
        epochs.append([keys[:n], keys[n : 2 * n]])
    assert [len(e[0]) for e in epochs] == [748, 749]
    for mine, theirs in zip(*epochs, strict=True):
        assert len(set(mine)) == len(mine) and len(set(theirs)) == len(theirs)
        assert not set(mine) & set(theirs) and set(mine) | set(theirs) == everything


def _varied(spec: ViewSpec, **changes: object) -> ViewSpec:
    return ViewSpec(spec.size, replace(spec.aug, **changes))


def test_flip_mirrors_the_decoded_image_and_the_parameters_say_so(color_shards: list[str]) -> None:
    view, flipped, _, outputs = _run(color_shards, (PLAIN, _varied(PLAIN, flip_p=1.0)))
    image = _decoded(color_shards, _keys(outputs[-1]))
    params = [torch.from_numpy(outputs[i].as_array()) for i in (1, 3)]
    assert (params[0][:, COLUMN["flip"]] == 0).all() and (params[1][:, COLUMN["flip"]] == 1).all()
    torch.testing.assert_close(_pixels(view), image, atol=1e-3, rtol=0)
    torch.testing.assert_close(_pixels(flipped), image.flip(-1), atol=1e-3, rtol=0)


def test_grayscale_makes_channels_equal(color_shards: list[str]) -> None:
    color = ViewSpec(24, Augmentation(jitter_p=0.0, grayscale_p=0.0))
    view, gray, _, _ = _run(color_shards, (color, _varied(color, grayscale_p=1.0)))
    spread = [(x.amax(1) - x.amin(1)).amax((1, 2)) for x in (_pixels(view), _pixels(gray))]  # per image
    assert (spread[0] > 20).all() and (spread[1] < 0.01).all()


@pytest.mark.parametrize("threshold", [128, 200])
def test_solarize_inverts_pixels_from_the_threshold(color_shards: list[str], threshold: int) -> None:
    view, solarized, _, _ = _run(color_shards, (PLAIN, _varied(PLAIN, solarize_p=1.0, solarize_threshold=threshold)))
    pixels = _pixels(view).round()
    assert (pixels >= threshold).float().mean() > 0.05
    expected = torch.where(pixels >= threshold, 255 - pixels, pixels)
    torch.testing.assert_close(_pixels(solarized), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("which", ["brightness", "contrast"])
def test_jitter_scales_about_black_or_the_mean_gray(color_shards: list[str], which: str) -> None:
    jitter = (0.4, 0.0, 0.0, 0.0) if which == "brightness" else (0.0, 0.4, 0.0, 0.0)
    view, jittered, _, _ = _run(color_shards, (PLAIN, _varied(PLAIN, jitter=jitter, jitter_p=1.0)))
    factors = []
    for before, after in zip(_pixels(view), _pixels(jittered), strict=True):
        center = 0.0 if which == "brightness" else (before * torch.tensor(LUMA).view(3, 1, 1)).sum(0).mean()
        kept = ((before - center).abs() > 20) & (after > 1) & (after < 254)  # away from rounding and the clamp
        ratio = ((after - center) / (before - center))[kept]
        assert ratio.std() < 0.01
        factors.append(ratio.median().item())
    assert min(factors) > 0.6 - 1e-3 and max(factors) < 1.4 + 1e-3 and np.std(factors) > 0.05


def test_index_files_are_used_only_when_every_shard_has_one(tmp_path: Path) -> None:
    shards = [str(tmp_path / f"s{i}.tar") for i in range(2)]
    (tmp_path / "s0.idx").write_text("")
    assert index_paths(shards) is None
    (tmp_path / "s1.idx").write_text("")
    assert index_paths(shards) == [str(tmp_path / "s0.idx"), str(tmp_path / "s1.idx")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_views_match_the_cpu_pipeline_in_shape_and_statistics(demo_shards: dict[str, Path]) -> None:
    shards, views = list_shards(str(demo_shards["val"])), moco_views("v3", 24)
    gpu = DaliTwoViewLoader(StreamSpec(shards, views, 32), device_id=0, num_threads=2, channels_last=True)
    cpu = DaliTwoViewLoader(StreamSpec(shards, views, 32), num_threads=2)
    (view1, view2, labels), (cpu1, _, _) = next(gpu), next(cpu)
    assert view1.device.type == view2.device.type == "cuda" and labels.dtype == torch.int64
    assert view1.shape == (32, 3, 24, 24) and view1.is_contiguous(memory_format=torch.channels_last)
    assert abs(view1.mean().item() - cpu1.mean().item()) < 0.5 and (view1 - view2).abs().mean() > 0.1
