"""The torch loader's device path (a GPU without DALI), run here on the CPU device: JPEGs decoded in batches by
torchvision, cropped and augmented by the same code as the workers' path, whose views it must give."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_scale.data.augment import moco_views
from moco_scale.data.device_views import DeviceViews, decode_on, jpeg_to_decode
from moco_scale.data.shards import StreamSpec, list_shards, write_shards
from moco_scale.data.torch_loader import two_view_loader

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Crops of scikit-learn's two sample photos at 96x72 (a few 72x96), as JPEG shards and as PNG shards."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images = []
    for i in range(48):
        photo = load_sample_images().images[i % 2]
        top, left = rng.integers(0, 100), rng.integers(0, 200)
        size = (72, 96) if i % 4 == 3 else (96, 72)
        images.append(Image.fromarray(photo[top : top + 320, left : left + 400]).resize(size))
    folder = tmp_path_factory.mktemp("photos")
    shards = {}
    for kind in ("JPEG", "PNG"):
        samples = []
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format=kind, **({"quality": 92} if kind == "JPEG" else {}))
            samples.append((f"p{i:03d}", buffer.getvalue(), i % 2))
        write_shards(samples, folder / kind, samples_per_shard=16)
        shards[kind] = list_shards(str(folder / kind))
    return shards


def _pairs(stream: StreamSpec, n: int, **kwargs: object) -> list[tuple[torch.Tensor, ...]]:
    batches = two_view_loader(stream, 0, **kwargs)
    return [next(batches) for _ in range(n)]


def test_device_views_match_the_worker_views_for_the_same_seed(photos: dict[str, list[str]]) -> None:
    """Same draws (crop boxes, parameters), and pixels equal up to the two resizes' rounding."""
    stream = StreamSpec(photos["JPEG"], moco_views("v2", 32), 12, seed=4, shuffle_buffer=10)
    for worker, device in zip(_pairs(stream, 3), _pairs(stream, 3, augment_on=CPU), strict=True):
        assert torch.equal(worker[2], device[2])  # the same samples in the same order
        for a, b in zip(worker[:2], device[:2], strict=True):
            assert a.shape == b.shape == (12, 3, 32, 32)
            assert (a - b).abs().mean() < 0.02 and (a - b).abs().mean() < 0.02 * a.abs().mean()


def test_what_the_device_cannot_decode_is_cropped_in_the_worker_exactly_as_there(
    photos: dict[str, list[str]],
) -> None:
    stream = StreamSpec(photos["PNG"], moco_views("v2", 32), 12, seed=4, shuffle_buffer=10)
    for worker, device in zip(_pairs(stream, 2), _pairs(stream, 2, augment_on=CPU), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(worker, device, strict=True))


def test_the_device_path_resumes_exactly_and_comes_in_the_engine_dtype(photos: dict[str, list[str]]) -> None:
    stream = StreamSpec(photos["JPEG"], moco_views("v3", 32), 8, rank=1, world_size=2, seed=2, shuffle_buffer=6)
    batches = two_view_loader(stream, 2, augment_on=CPU, dtype=torch.bfloat16)
    for _ in range(2):
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]  # past this rank's epoch of 24
    resumed = two_view_loader(stream, 2, augment_on=CPU, dtype=torch.bfloat16, state=state)
    for a, b in zip(expected, (next(resumed) for _ in range(4)), strict=True):
        assert a[0].dtype == torch.bfloat16 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_batch_decode_falls_back_per_image_and_drops_what_no_decoder_takes(photos: dict[str, list[str]]) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 90)).save(jpeg, format="JPEG", quality=95)
    png = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(png, format="PNG")
    assert jpeg_to_decode(jpeg.getvalue()) == (jpeg.getvalue(), (20, 10))
    assert jpeg_to_decode(png.getvalue()) is None and jpeg_to_decode(jpeg.getvalue()[:-40]) is None
    payloads = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in (jpeg.getvalue(), png.getvalue(), b"??")]
    decoded = decode_on(payloads, CPU)
    assert decoded[0].shape == (3, 10, 20)
    assert (decoded[0][:, 5, 10].int() - torch.tensor([200, 30, 90])).abs().max() < 4
    assert torch.equal(decoded[1], torch.tensor([10, 20, 30], dtype=torch.uint8)[:, None, None].expand(3, 4, 6))
    assert decoded[2] is None
    views = DeviceViews(moco_views("v2", 8), CPU)
    boxes = torch.tensor([[[0, 0, 20, 10]] * 2, [[0, 0, 6, 4]] * 2, [[0, 0, 1, 1]] * 2])
    params = torch.zeros(3, 11)
    empty = [torch.empty(0, dtype=torch.uint8)] * 3
    view1, view2, labels = views((payloads, boxes, empty, params, empty, params, torch.tensor([0, 1, 2])))
    assert view1.shape == view2.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1] and views.dropped == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_and_augmentation_match_the_cpu_device_path(photos: dict[str, list[str]]) -> None:
    stream = StreamSpec(photos["JPEG"], moco_views("v2", 32), 12, seed=4, shuffle_buffer=10)
    gpu = torch.device("cuda")
    for cpu, cuda in zip(_pairs(stream, 3, augment_on=CPU), _pairs(stream, 3, augment_on=gpu), strict=True):
        assert cuda[0].device.type == "cuda" and torch.equal(cpu[2], cuda[2].cpu())
        for a, b in zip(cpu[:2], cuda[:2], strict=True):
            assert (a - b.cpu()).abs().mean() < 0.03  # nvJPEG and libjpeg-turbo round differently


def test_two_view_batches_take_the_device_path_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from moco_scale.data import loader

    seen = {}
    monkeypatch.setattr(loader, "two_view_loader", lambda *a, **k: seen.update(k))
    for device in (CPU, torch.device("cuda", 0)):
        stream = StreamSpec([str(tmp_path / "x.tar")], moco_views("v2", 8), 2)
        loader.two_view_batches("torch", stream, workers=0, device=device)
        assert seen["augment_on"] == (device if device.type == "cuda" else None)
