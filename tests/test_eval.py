"""The kNN monitor: weighted kNN against a plain reference, separable vs shuffled labels (synthetic and on the demo
digits), the labelled evaluation loader, and feature extraction and the sharded bank on 2 gloo ranks."""

from __future__ import annotations

import io
import itertools
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from PIL import Image
from torch import nn

from moco_scale.config import EvalConfig
from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_scale.data.labelled import eval_loader, num_classes_of
from moco_scale.data.shards import list_shards, write_shards
from moco_scale.eval.knn import KnnMonitor, extract_features, knn_predict, knn_top1
from moco_scale.models import build_resnet


def reference_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, t: float) -> list[int]:
    """fb/moco's weighted kNN, one query at a time, in float64 over the whole bank."""
    predictions = []
    for query in queries.double():
        sims = bank.double() @ query
        votes = [0.0] * (int(bank_labels.max()) + 1)
        for i in sims.argsort(descending=True)[:k].tolist():
            votes[int(bank_labels[i])] += math.exp(float(sims[i]) / t)
        predictions.append(max(range(len(votes)), key=votes.__getitem__))
    return predictions


def _random_features(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=generator), dim=1)


@pytest.mark.parametrize(
    ("k", "chunk", "bank_chunk"),
    [(200, 256, 65536), (10, 7, 13), (1, 41, 97), (25, 1, 1000), (10, 50, 10), (97, 16, 32)],
)
@pytest.mark.usefixtures("one_thread")
def test_knn_matches_the_plain_reference(k: int, chunk: int, bank_chunk: int) -> None:
    """k above the bank size, chunks that do not divide the queries or the bank, chunks larger than both."""
    generator = torch.Generator().manual_seed(k * 1000 + chunk)
    bank, queries = _random_features(97, 16, generator), _random_features(41, 16, generator)
    bank_labels = torch.randint(0, 5, (97,), generator=generator)
    query_labels = torch.randint(0, 5, (41,), generator=generator)
    expected = reference_knn(bank, bank_labels, queries, k, 0.1)
    predicted = knn_predict((bank, bank_labels), queries, 5, k=k, chunk=chunk, bank_chunk=bank_chunk)
    assert predicted.tolist() == expected
    expected_top1 = 100.0 * sum(p == y for p, y in zip(expected, query_labels.tolist(), strict=True)) / 41
    top1 = knn_top1((bank, bank_labels), (queries, query_labels), 5, k=k, chunk=chunk, bank_chunk=bank_chunk)
    assert top1 == pytest.approx(expected_top1)
    assert 0 < expected_top1 < 100  # random labels: the comparison is not trivially all right or all wrong


def _clustered(labels: torch.Tensor, dim: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    centroids = torch.eye(dim)[labels]
    return F.normalize(centroids + noise * torch.randn(len(labels), dim, generator=generator), dim=1)


@pytest.mark.parametrize("temperature", [0.005, 0.1])
@pytest.mark.usefixtures("one_thread")
def test_knn_votes_stay_finite_at_small_temperatures(temperature: float) -> None:
    """exp(similarity / 0.005) overflows fp32 (e^200); the votes must still match the float64 reference."""
    generator = torch.Generator().manual_seed(7)
    bank_labels, query_labels = torch.randint(0, 6, (300,), generator=generator), torch.randint(0, 6, (80,))
    bank, queries = _clustered(bank_labels, 16, 0.3, generator), _clustered(query_labels, 16, 0.3, generator)
    expected = reference_knn(bank, bank_labels, queries, 20, temperature)
    assert (
        knn_predict((bank, bank_labels), queries, 6, k=20, temperature=temperature, chunk=32, bank_chunk=64).tolist()
        == expected
    )
    assert sum(p == y for p, y in zip(expected, query_labels.tolist(), strict=True)) > 0.6 * 80  # not chance


@pytest.mark.usefixtures("one_thread")
def test_separable_features_score_near_100_and_shuffled_labels_near_chance() -> None:
    generator = torch.Generator().manual_seed(0)
    bank_labels, query_labels = torch.arange(1000) % 10, torch.randint(0, 10, (500,), generator=generator)
    bank, queries = _clustered(bank_labels, 32, 0.15, generator), _clustered(query_labels, 32, 0.15, generator)
    assert knn_top1((bank, bank_labels), (queries, query_labels), 10, chunk=64) >= 99.0
    shuffled = bank_labels[torch.randperm(1000, generator=generator)]
    assert abs(knn_top1((bank, shuffled), (queries, query_labels), 10, chunk=64) - 10.0) < 5.0


class PixelProjection(nn.Module):
    """Features that separate the digits: a fixed random projection of the normalised pixels."""

    def __init__(self, image_size: int = 32, dim: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.project = nn.Linear(3 * image_size * image_size, dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images.flatten(1))


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _demo_samples(folder: Path) -> list[tuple[str, bytes, int]]:
    """The (key, jpeg, label) samples of a demo split, in the shards' order."""
    samples = []
    for shard in list_shards(str(folder)):
        members = _members(Path(shard))
        keys = sorted({name.split(".")[0] for name in members})
        samples += [(key, members[f"{key}.jpg"], int(members[f"{key}.cls"])) for key in keys]
    return samples


def test_demo_monitor_separable_features_score_high_and_shuffled_labels_near_chance(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    val = list_shards(str(demo_shards["val"]))
    monitor = KnnMonitor(list_shards(str(demo_shards["train"])), val, 32, EvalConfig(), rank=0, world_size=1)
    assert monitor(PixelProjection()) >= 85.0  # raw pixels: 90.0; a random-init ResNet-18: 76.0
    samples = _demo_samples(demo_shards["train"])
    labels = torch.tensor([label for _, _, label in samples])[torch.randperm(len(samples))].tolist()
    shuffled = [(key, jpeg, label) for (key, jpeg, _), label in zip(samples, labels, strict=True)]
    write_shards(shuffled, tmp_path, 500, class_names=[str(c) for c in range(10)])
    shuffled_monitor = KnnMonitor(list_shards(str(tmp_path)), val, 32, EvalConfig(), rank=0, world_size=1)
    assert abs(shuffled_monitor(PixelProjection()) - 10.0) < 7.0


def test_extract_features_restores_the_mode_and_keeps_bn_statistics(demo_shards: dict[str, Path]) -> None:
    torch.manual_seed(0)
    backbone = build_resnet("resnet18").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    batches = list(itertools.islice(eval_loader(list_shards(str(demo_shards["val"])), 32, 16, 0, 1), 3))
    features, labels = extract_features(backbone, batches, torch.device("cpu"))
    assert backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # eval mode: BN stats untouched
    assert features.shape == (48, 512) and labels.shape == (48,) and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=1), torch.ones(48))
    with torch.no_grad():
        first_image = batches[0][0][:1]
        torch.testing.assert_close(features[0], F.normalize(backbone.eval()(first_image), dim=1)[0])


def _one_pass(shards: list[str], world: int, workers: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for rank in range(world):
        for x, y in eval_loader(shards, 32, batch, rank, world, workers):
            assert len(x) <= batch
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize(("world", "workers", "batch"), [(2, 0, 64), (3, 2, 7), (7, 0, 16)])
def test_eval_loader_covers_every_sample_once_in_shard_order(
    demo_shards: dict[str, Path], world: int, workers: int, batch: int
) -> None:
    shards = list_shards(str(demo_shards["val"]))
    images, labels = _one_pass(shards, 1, 0, 300)
    expected = _demo_samples(demo_shards["val"])
    assert labels.tolist() == [label for _, _, label in expected]
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(expected[0][1])))).float().flatten(0, 1).T / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    torch.testing.assert_close(images[0].flatten(1), (pixels - mean) / std)  # 32 px is used whole: no resize
    split_images, split_labels = _one_pass(shards, world, workers, batch)
    assert torch.equal(split_labels, labels) and torch.equal(split_images, images)


def test_eval_view_resizes_and_centre_crops(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["val"]))
    for size in (24, 64):
        images, _ = next(iter(eval_loader(shards, size, 4, 0, 1)))
        assert images.shape == (4, 3, size, size)
    assert num_classes_of(shards) == 10


def test_eval_loader_skips_undecodable_samples(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    samples = _demo_samples(demo_shards["val"])[:40]
    bad = {2: b"not a jpeg", 5: samples[5][1][:40], 9: b""}  # garbage, truncated JPEG, zero bytes
    written = [(key, bad.get(i, jpeg), label) for i, (key, jpeg, label) in enumerate(samples)]
    write_shards(written[:20], tmp_path / "a", samples_per_shard=10)
    write_shards(written[20:], tmp_path / "b", samples_per_shard=10)
    shards = list_shards(str(tmp_path / "*" / "*.tar"))
    good = [label for i, (_, _, label) in enumerate(samples) if i not in bad]
    for world, workers, batch in [(1, 0, 8), (2, 2, 4), (3, 0, 5)]:
        _, labels = _one_pass(shards, world, workers, batch)
        assert labels.tolist() == good, (world, workers, batch)


def _sharded_bank_matches_the_reference(rank: int, synthetic: dict[str, torch.Tensor]) -> None:
    bank, bank_labels, queries = synthetic["bank"], synthetic["bank_labels"], synthetic["queries"]
    for split in (0, 37):  # rank 0 holds no bank rows; both hold fewer than k
        mine = slice(0, split) if rank == 0 else slice(split, len(bank))
        for k, chunk, bank_chunk in [(10, 7, 5), (50, 64, 1000), (1, 3, 2)]:
            predicted = knn_predict(
                (bank[mine], bank_labels[mine]), queries, 4, k=k, chunk=chunk, bank_chunk=bank_chunk, sharded_bank=True
            )
            assert predicted.tolist() == reference_knn(bank, bank_labels, queries, k, 0.1), (rank, split, k)


def _two_ranks(
    rank: int,
    world: int,
    train: list[str],
    val: list[str],
    expected: dict[str, torch.Tensor | float],
    synthetic: dict[str, torch.Tensor],
    single: list[str],
) -> None:
    backbone = PixelProjection()
    batches = eval_loader(val, 32, 64, rank, world)
    features, labels = extract_features(backbone, batches, torch.device("cpu"))
    assert len(labels) == 300 and torch.equal(labels, expected["labels"])  # each sample once, in shard order
    torch.testing.assert_close(features, expected["features"], rtol=0, atol=1e-5)
    local, _ = extract_features(backbone, batches, torch.device("cpu"), gather=False)
    assert len(local) == 150
    top1 = KnnMonitor(train, val, 32, EvalConfig(batch_size=128), rank, world)(PixelProjection())
    assert abs(top1 - expected["knn_top1"]) <= 100 / 300 + 1e-9  # at most one near-tie decided otherwise
    same = torch.tensor([top1, -top1])
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MAX)
    assert same[0] == -same[1] == top1  # the same value on every rank
    _sharded_bank_matches_the_reference(rank, synthetic)
    lone, lone_labels = extract_features(backbone, eval_loader(single, 32, 8, rank, world), torch.device("cpu"))
    assert lone.shape == (1, 256) and lone_labels.tolist() == [expected["labels"][0]]  # rank 0 read nothing


@pytest.mark.slow
def test_two_ranks_see_every_sample_once_and_agree_with_one_process(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    """Features and labels gathered from 2 ranks equal one process's; the monitor's sharded bank gives one
    process's kNN top-1, the same on both ranks; sharded kNN matches the reference (a rank may hold no bank);
    a rank with no sample at all still gathers the other's."""
    train, val = list_shards(str(demo_shards["train"])), list_shards(str(demo_shards["val"]))
    features, labels = extract_features(PixelProjection(), eval_loader(val, 32, 64, 0, 1), torch.device("cpu"))
    knn = KnnMonitor(train, val, 32, EvalConfig(batch_size=128), 0, 1)(PixelProjection())
    expected = {"features": features, "labels": labels, "knn_top1": knn}
    generator = torch.Generator().manual_seed(1)
    synthetic = {
        "bank": _random_features(90, 8, generator),
        "bank_labels": torch.randint(0, 4, (90,), generator=generator),
        "queries": _random_features(30, 8, generator),
    }
    write_shards(_demo_samples(demo_shards["val"])[:1], tmp_path)
    run_ranks(_two_ranks, 2, train, val, expected, synthetic, list_shards(str(tmp_path)))
