"""Backend choice: DALI and the torch fallback serve the same batches' shapes through one call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moco_scale.data import loader
from moco_scale.data.augment import moco_views
from moco_scale.data.shards import DataError, list_shards, write_shards


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
    batches = loader.two_view_batches(
        backend,
        list_shards(str(demo_shards["val"])),
        moco_views("v2", 24),
        8,
        0,
        1,
        workers=1,
        seed=0,
        shuffle_buffer=16,
        device=torch.device("cpu"),
    )
    view1, view2, labels = next(iter(batches))
    assert view1.shape == view2.shape == (8, 3, 24, 24) and view1.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (8,) and 0 <= labels.min() <= labels.max() <= 9
    assert not torch.equal(view1, view2)


def _demo_stream(demo_shards: dict[str, Path], rank: int, world_size: int, seed: int) -> dict:
    """``two_view_batches`` arguments for 8 v2 pairs of 16 px from the held-out demo digits, on the CPU."""
    return dict(
        shards=list_shards(str(demo_shards["val"])),
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
    first = loader.two_view_batches(backend, **kwargs)
    for _ in range(23):  # past the 150-sample epoch of this rank
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    resumed = loader.two_view_batches(backend, state=state, **kwargs)
    for (a1, a2, al), (b1, b2, bl) in zip(expected, (next(resumed) for _ in range(3)), strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(al, bl)


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_views_come_in_the_engine_dtype(demo_shards: dict[str, Path], backend: str, dtype: torch.dtype) -> None:
    """The same batch as in fp32, rounded once to ``dtype`` (DALI makes fp16 itself, so allow its own rounding)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    kwargs = _demo_stream(demo_shards, rank=0, world_size=1, seed=2)
    full = next(loader.two_view_batches(backend, **kwargs))
    half = next(loader.two_view_batches(backend, dtype=dtype, **kwargs))
    assert half[0].dtype == half[1].dtype == dtype and torch.equal(half[2], full[2])
    for got, want in zip(half[:2], full[:2], strict=True):
        if backend == "dali" and dtype == torch.float16:
            torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(got, want.to(dtype))
