"""Backend choice: DALI and the torch fallback serve the same batches' shapes through one call."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from moco_scale.data import loader, torch_loader
from moco_scale.data.augment import moco_views
from moco_scale.data.loader import Batch
from moco_scale.data.shards import DataError, StreamSpec, list_shards, write_shards
from moco_scale.data.torch_loader import decode_sample


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch, demo_shards: dict[str, Path], tmp_path: Path) -> None:
    write_shards([("k", b"not checked", 0)], tmp_path / "checked")
    manifest = tmp_path / "checked" / "manifest.json"  # as a check with both decoders leaves it
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "checked_with": ["pil", "dali"]}))
    checked = list_shards(str(tmp_path / "checked"))
    write_shards([("k", b"not checked", 0)], tmp_path / "unchecked")
    unchecked = list_shards(str(tmp_path / "unchecked"))
    assert loader.resolve_backend("torch", checked) == "torch"
    monkeypatch.setattr(loader, "dali_available", lambda: False)
    assert loader.resolve_backend("auto", checked) == "torch"
    with pytest.raises(DataError, match="data.backend=dali but NVIDIA DALI is not installed"):
        loader.resolve_backend("dali", checked)
    monkeypatch.setattr(loader, "dali_available", lambda: True)
    assert loader.resolve_backend("auto", checked) == "dali"
    assert loader.resolve_backend("auto", unchecked) == "torch"  # DALI would stop on a corrupt image
    assert loader.resolve_backend("auto", checked + unchecked) == "torch"
    with pytest.raises(DataError, match="were not checked with DALI's decoder, which stops on a corrupt image"):
        loader.resolve_backend("dali", unchecked)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_backends_yield_two_view_batches(demo_shards: dict[str, Path], backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    batches = _two_view_batches(
        backend,
        inputs=list_shards(str(demo_shards["val"])),
        views=moco_views("v2", 24),
        batch_size=8,
        workers=1,
        seed=0,
        shuffle_buffer=16,
        device=torch.device("cpu"),
    )
    view1, view2, labels = next(iter(batches))
    assert view1.shape == view2.shape == (8, 3, 24, 24) and view1.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (8,) and 0 <= labels.min() <= labels.max() <= 9
    assert not torch.equal(view1, view2)


STREAM_FIELDS = {field.name for field in fields(StreamSpec)}


def _split(kwargs: dict) -> tuple[StreamSpec, dict]:
    """The :class:`StreamSpec` fields among ``kwargs``, gathered into one, and the rest."""
    stream = StreamSpec(**{k: v for k, v in kwargs.items() if k in STREAM_FIELDS})
    return stream, {k: v for k, v in kwargs.items() if k not in STREAM_FIELDS}


def _two_view_batches(backend: str, **kwargs: object) -> Iterator[Batch]:
    stream, rest = _split(kwargs)
    return loader.two_view_batches(backend, stream, **rest)


def _two_view_loader(**kwargs: object) -> torch_loader.StreamBatches:
    stream, rest = _split(kwargs)
    return torch_loader.two_view_loader(stream, **rest)


def _demo_stream(demo_shards: dict[str, Path], rank: int, world_size: int, seed: int) -> dict:
    """``two_view_batches`` arguments for 8 v2 pairs of 16 px from the held-out demo digits, on the CPU."""
    return dict(
        inputs=list_shards(str(demo_shards["val"])),
        views=moco_views("v2", 16),
        batch_size=8,
        rank=rank,
        world_size=world_size,
        workers=1,
        seed=seed,
        shuffle_buffer=16,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_state_dict_resumes_the_stream_exactly(demo_shards: dict[str, Path], backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    kwargs = _demo_stream(demo_shards, rank=1, world_size=2, seed=4)
    first = _two_view_batches(backend, **kwargs)
    for _ in range(23):  # past the 150-sample epoch of this rank
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    resumed = _two_view_batches(backend, state=state, **kwargs)
    for (a1, a2, al), (b1, b2, bl) in zip(expected, (next(resumed) for _ in range(3)), strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(al, bl)


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_views_come_in_the_engine_dtype(demo_shards: dict[str, Path], backend: str, dtype: torch.dtype) -> None:
    """The same batch as in fp32, rounded once to ``dtype`` (DALI makes fp16 itself, so allow its own rounding)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    kwargs = _demo_stream(demo_shards, rank=0, world_size=1, seed=2)
    full = next(_two_view_batches(backend, **kwargs))
    half = next(_two_view_batches(backend, dtype=dtype, **kwargs))
    assert half[0].dtype == half[1].dtype == dtype and torch.equal(half[2], full[2])
    for got, want in zip(half[:2], full[:2], strict=True):
        if backend == "dali" and dtype == torch.float16:
            torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(got, want.to(dtype))


def _digit_shards(demo_shards: dict[str, Path], folder: Path, n: int, bad: dict[int, bytes] | None = None) -> list[str]:
    """``n`` held-out demo digits in shards of 8, those at the indices of ``bad`` replaced by its bytes."""
    with tarfile.open(list_shards(str(demo_shards["val"]))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})[:n]
    samples = [(k, (bad or {}).get(i, members[f"{k}.jpg"]), int(members[f"{k}.cls"])) for i, k in enumerate(keys)]
    return [str(s) for s in write_shards(samples, folder, samples_per_shard=8)]


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_decodes_the_same_few_images_after_1_and_10_epochs(
    demo_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed mid-epoch after 1 and after 10 epochs of 16 samples, the loader decodes one batch before its first
    batch (replaying from step 0 decoded 24 and 168 images), and that batch is the one the run went on with."""
    shards = _digit_shards(demo_shards, tmp_path, 16)
    kwargs = dict(views=moco_views("v2", 16), batch_size=4, rank=0, world_size=1, workers=0, shuffle_buffer=8)
    run = _two_view_loader(inputs=shards, **kwargs)
    saved = {}
    for step in range(43):
        state = run.state_dict()
        batch = next(run)
        if step in (6, 42):  # 1.5 and 10.5 epochs of 4 batches
            saved[step] = state, batch
    decodes = []

    def counted(sample: dict | None) -> tuple | None:
        decodes.append(sample)
        return decode_sample(sample)

    monkeypatch.setattr(torch_loader, "decode_sample", counted)
    for step, (state, expected) in saved.items():
        decodes.clear()
        assert state["readers"][0][:2] == [step // 4, step % 4 * 4], state
        assert _same(next(_two_view_loader(inputs=shards, state=state, **kwargs)), expected)
        assert len(decodes) == 4, (step, len(decodes))


def test_resume_mid_epoch_with_workers_continues_bitwise_and_keeps_counting_bad_samples(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    shards = _digit_shards(demo_shards, tmp_path, 80, {3: b"junk", 21: b"", 40: b"\xff\xd8 cut", 77: b"junk"})
    kwargs = {**_demo_stream(demo_shards, rank=1, world_size=2, seed=3), "inputs": shards, "workers": 2}
    run = _two_view_batches("torch", **kwargs)
    for _ in range(3):  # mid-epoch: each of the rank's 2 readers serves 20 samples an epoch, 8 a batch
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(9)]  # into the third epoch
    resumed = _two_view_batches("torch", state=state, **kwargs)
    assert all(_same(a, b) for a, b in zip(expected, (next(resumed) for _ in range(9)), strict=True))
    assert resumed.state_dict() == run.state_dict() and resumed.bad_samples == run.bad_samples == 2 * 2


def test_another_layout_or_backend_restarts_at_the_global_sample_count(demo_shards: dict[str, Path]) -> None:
    kwargs = {**_demo_stream(demo_shards, rank=0, world_size=1, seed=1), "workers": 2}
    two = _two_view_batches("torch", **kwargs)
    for _ in range(45):  # 360 of the 300 samples an epoch: epoch 1, 60 samples in
        next(two)
    state = two.state_dict()
    assert state["samples"] == 360 and state["epoch_samples"] == 300
    saved = loader.LoaderLayout("torch", world_size=1, batch_size=8, workers=2, seed=1, shuffle_buffer=16)
    assert loader.remap_state(state, saved, saved) is state  # the same layout: exact
    one_worker = loader.remap_state(state, saved, replace(saved, workers=1))
    assert one_worker == {"samples": 360, "epoch_samples": 300, "bad_samples": 0}
    one = _two_view_batches("torch", state=one_worker, **{**kwargs, "workers": 1})
    assert one.state_dict()["readers"] == [[1, 60, 0]] and one.state_dict()["samples"] == 360
    next(one)
    assert one.state_dict()["samples"] == 368
    two_ranks = _two_view_batches("torch", state=one_worker, **{**kwargs, "world_size": 2, "workers": 2})
    assert two_ranks.state_dict()["readers"] == [[1, 15, 0]] * 2 and two_ranks.state_dict()["samples"] == 360
    assert loader.remap_state({"batches": 7}, 2, 1) is None  # a state from before positions were saved: afresh
    if not loader.dali_available():
        return
    dali = _two_view_batches("dali", state=state, **kwargs)  # no DALI checkpoint: a new pass, counting on
    next(dali)
    dali_state = dali.state_dict()
    assert dali_state["samples"] == 368 and dali_state["epoch_samples"] == 300 and "dali" in dali_state
    back = _two_view_batches("torch", state=dali_state, **kwargs)
    assert back.state_dict()["readers"] == [[1, 34, 0]] * 2  # 68 of 300 into epoch 1, over 2 readers of 150
