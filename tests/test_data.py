"""Shards, the demo data and the two-view loader, on the real demo JPEGs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from moco_scale.data.augment import moco_views
from moco_scale.data.shards import DataError, StreamSpec, list_shards, write_shards
from moco_scale.data.sources import count_samples
from moco_scale.data.torch_loader import TwoViewStream, split_epoch, two_view_loader


def _read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _demo_samples(demo_shards: dict[str, Path], n: int) -> list[tuple[str, bytes, int]]:
    members = _read_tar(sorted(demo_shards["val"].glob("*.tar"))[0])
    keys = sorted({name.split(".")[0] for name in members})[:n]
    return [(k, members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]


def test_shards_round_trip_byte_identical(tmp_path: Path, demo_shards: dict[str, Path]) -> None:
    samples = _demo_samples(demo_shards, 25)
    shards = write_shards(samples, tmp_path, samples_per_shard=10, prefix="t", class_names=["a"])
    assert [p.name for p in shards] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    members: dict[str, bytes] = {}
    for shard in shards:
        members.update(_read_tar(shard))
    for key, jpeg, label in samples:
        assert members[f"{key}.jpg"] == jpeg and int(members[f"{key}.cls"]) == label
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == 25 and [s["samples"] for s in manifest["shards"]] == [10, 10, 5]
    assert count_samples([str(s) for s in shards]) == 25
    (tmp_path / "manifest.json").unlink()
    assert count_samples([str(s) for s in shards]) == 25  # counted by reading when there is no manifest


def test_demo_data_is_real_digits(demo_shards: dict[str, Path]) -> None:
    assert count_samples(list_shards(str(demo_shards["train"]))) == 1497
    assert count_samples(list_shards(str(demo_shards["val"]))) == 300
    _, jpeg, label = _demo_samples(demo_shards, 1)[0]
    image = Image.open(io.BytesIO(jpeg))
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label <= 9


def test_list_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no .tar shards"):
        list_shards(str(tmp_path))
    with pytest.raises(DataError, match="no .tar shards match"):
        list_shards(str(tmp_path / "*.tar"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="is not a .tar shard"):
        list_shards(str(tmp_path / "x.txt"))


def test_two_views_differ_and_have_the_configured_shape(demo_shards: dict[str, Path]) -> None:
    torch.manual_seed(0)
    loader = two_view_loader(
        StreamSpec(list_shards(str(demo_shards["val"])), moco_views("v2", 24), 8, shuffle_buffer=16)
    )
    view1, view2, labels = next(loader)
    assert view1.shape == view2.shape == (8, 3, 24, 24) and view1.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9
    assert (view1 - view2).abs().mean() > 0.1
    assert -3 < view1.mean() < 3  # normalised


@pytest.mark.parametrize("world", [2, 3, 16])
def test_every_sample_once_per_epoch_across_ranks(demo_shards: dict[str, Path], world: int) -> None:
    shards = list_shards(str(demo_shards["train"]))  # 8 shards: world 16 has more ranks than shards
    orders = {}
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(world):
            stream = TwoViewStream(shards, moco_views("v2", 32), rank, world, seed=3, shuffle_buffer=50)
            raw = stream.raw_stream()
            per_rank = [next(raw) for _ in range(1497 // world * (epoch + 1))][-(1497 // world) :]
            assert {e for e, _, _ in per_rank} == {epoch}
            seen += [s["__key__"] for _, _, s in per_rank]
        assert len(seen) == len(set(seen)) == 1497 - 1497 % world  # the remainder is < world
        orders[epoch] = seen
    assert orders[0] != orders[1]  # the order changes every epoch


def test_split_epoch_covers_each_sample_once() -> None:
    sizes = {"a": 5, "b": 3, "c": 4}
    for blocks in (1, 2, 3, 5, 12):
        taken = [
            (s.part, i)
            for b in range(blocks)
            for s in split_epoch(sizes, 0, 1, b, blocks)
            for i in range(s.first, s.end)
        ]
        assert len(taken) == len(set(taken)) == 12 - 12 % blocks


def _batches(loader, n: int) -> list[torch.Tensor]:
    return [torch.cat([v1.flatten(1), v2.flatten(1)], 1) for v1, v2, _ in (next(loader) for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_reported_position_gives_the_same_batches(demo_shards: dict[str, Path], workers: int) -> None:
    shards = list_shards(str(demo_shards["val"]))
    stream = StreamSpec(shards, moco_views("v2", 16), 8, rank=1, world_size=2, seed=5, shuffle_buffer=20)
    loader = two_view_loader(stream, workers)
    uninterrupted = _batches(loader, 7)
    state = loader.state_dict()
    uninterrupted += _batches(loader, 5)  # crosses the 150-sample epoch boundary
    resumed = _batches(two_view_loader(stream, workers, state=state), 5)
    for a, b in zip(uninterrupted[7:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(uninterrupted[7], uninterrupted[8])


def test_too_few_samples_for_the_readers(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    write_shards(_demo_samples(demo_shards, 3), tmp_path)
    with pytest.raises(DataError, match="3 samples cannot feed 2 ranks x 2 loader workers"):
        two_view_loader(StreamSpec(list_shards(str(tmp_path)), moco_views("v2", 16), 1, world_size=2), workers=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_are_skipped_counted_and_resume_stays_exact(
    tmp_path: Path, demo_shards: dict[str, Path], workers: int
) -> None:
    samples = _demo_samples(demo_shards, 40)
    samples[2] = (samples[2][0], b"not a jpeg", 1)
    samples[5] = (samples[5][0], samples[5][1][:40], 1)  # truncated JPEG
    samples[9] = (samples[9][0], b"", 1)  # zero bytes
    write_shards(samples[:20], tmp_path / "a", samples_per_shard=10)
    write_shards(samples[20:], tmp_path / "b", samples_per_shard=10)
    shards = list_shards(str(tmp_path / "*" / "*.tar"))
    truncated = tmp_path / "b" / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])  # a truncated tar: its tail is lost
    manifest = tmp_path / "b" / "manifest.json"  # as an older manifest, without the shards' sizes, leaves it unseen
    content = json.loads(manifest.read_text())
    content["shards"] = [{"name": e["name"], "samples": e["samples"]} for e in content["shards"]]
    manifest.write_text(json.dumps(content))
    stream = StreamSpec(shards, moco_views("v2", 16), 4, shuffle_buffer=4)
    loader = two_view_loader(stream, workers)
    seen = _batches(loader, 9)
    state = loader.state_dict()
    seen += _batches(loader, 3)  # several epochs of the ~30 readable samples
    assert loader.bad_samples >= 3 + 9  # a full epoch: the 3 bad JPEGs, and the 9 places the cut tar lost
    resumed = _batches(two_view_loader(stream, workers, state=state), 3)
    for a, b in zip(seen[9:], resumed, strict=True):
        assert torch.equal(a, b)


def test_blur_window_follows_sigma() -> None:
    from moco_scale.data.augment import blur_window
    from moco_scale.data.torch_loader import SigmaGaussianBlur

    assert (blur_window(0.1), blur_window(1.0), blur_window(2.0)) == (3, 7, 13)
    delta = torch.zeros(1, 41, 41)
    delta[0, 20, 20] = 1.0
    blurred = SigmaGaussianBlur((1.5, 1.5))(delta)[0]
    assert abs(blurred.sum().item() - 1.0) < 1e-3  # +-3 sigma keeps all but ~0.3% of the mass
    offsets = torch.arange(41.0) - 20
    std = (blurred.sum(0) * offsets.pow(2)).sum().sqrt().item()
    assert abs(std - 1.5) < 0.1
