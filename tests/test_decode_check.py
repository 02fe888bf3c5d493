"""Decode checks (PIL and DALI's stricter decoder), the shard check of existing shards, and both loaders
streaming checked shards with corrupt samples in them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_scale.data import loader
from moco_scale.data.augment import moco_views
from moco_scale.data.decode_check import CHUNK, decode_errors, decoders
from moco_scale.data.make_shards import main
from moco_scale.data.shards import DataError, StreamSpec, checked_with, list_shards, write_shards
from moco_scale.data.torch_loader import TwoViewStream, two_view_loader


def _noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _damaged_header(jpeg: bytes) -> bytes:
    """200 bytes of the Huffman tables overwritten: PIL still decodes it, DALI's parser does not."""
    return jpeg[:300] + bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8)) + jpeg[500:]


def _pil_decodes(payload: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
    except Exception:
        return False
    return True


def _dali_decodes_alone(payload: bytes, folder: Path) -> bool:
    """Reference: the payload alone in a shard, through a plain DALI reader + CPU decoder pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    shard = folder / f"alone-{len(list(folder.glob('*.tar')))}.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("x.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        jpeg = fn.readers.webdataset(paths=[str(shard)], ext=["jpg"])
        return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)

    pipe = decode()
    try:
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    return True


KINDS = {
    "good": lambda good: good,
    "empty": lambda good: b"",
    "garbage": lambda good: b"not an image at all" * 10,
    "truncated": lambda good: good[: len(good) // 2],
    "no_end_marker": lambda good: good[:-2],
    "damaged_header": _damaged_header,
}


def test_decode_errors_match_each_decoder_alone(tmp_path: Path) -> None:
    """Every kind of damage at several places of a batch longer than one DALI call: flagged exactly when
    PIL or DALI, decoding that image alone, fails."""
    kinds = list(KINDS)
    payloads, expected_kinds = [], []
    for i in range(max(CHUNK, 9 * len(kinds)) + 20):  # every kind, over several DALI calls
        kind = kinds[i // 9 % len(kinds)] if i % 9 == 0 else "good"
        payloads.append(KINDS[kind](_noise_jpeg(i)))
        expected_kinds.append(kind)
    assert _pil_decodes(_damaged_header(_noise_jpeg(0)))  # the case only DALI catches
    pil_only = decode_errors(payloads, ["pil"])
    assert [e is None for e in pil_only] == [_pil_decodes(p) for p in payloads]
    if "dali" not in decoders():
        pytest.skip("DALI is not installed: only PIL checks")
    reference = {kind: _dali_decodes_alone(KINDS[kind](_noise_jpeg(1)), tmp_path) for kind in kinds}
    assert reference == {kind: kind == "good" for kind in kinds}
    both = decode_errors(payloads)
    assert [e is None for e in both] == [k == "good" for k in expected_kinds] and set(expected_kinds) == set(kinds)
    damaged = [e for e, k in zip(both, expected_kinds, strict=True) if k == "damaged_header"]
    assert damaged and all(e.startswith(("broken JPEG: ", "DALI's decoder rejects it")) for e in damaged)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def damaged_shards(tmp_path: Path, demo_shards: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """Two img2dataset-like shards of real demo digits (``jpg`` + ``json`` + ``cls``, no index), with
    damaged samples; the second tar is cut off inside a member. Returns the shards and the bad keys."""
    with tarfile.open(sorted(demo_shards["val"].glob("*.tar"))[0]) as tar:
        digits = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:40]
    damage = {3: "empty", 7: "damaged_header", 12: "garbage", 25: "truncated"}
    bad = {f"{i:05d}": kind for i, kind in damage.items()} | {"00030": "no image"}
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(20 * s, 20 * s + 20):
                key = f"{i:05d}"
                if key in bad and bad[key] == "no image":
                    _add(tar, f"{key}.json", b"{}")
                    continue
                _add(tar, f"{key}.jpg", KINDS[damage.get(i, "good")](digits[i]))
                _add(tar, f"{key}.json", json.dumps({"i": i}).encode())
                _add(tar, f"{key}.cls", str(i % 10).encode())
    second = folder / "00001.tar"
    with tarfile.open(second) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "00037.jpg").offset_data + 100
    second.write_bytes(second.read_bytes()[:cut])  # 00037 is cut off, 00038-00039 are lost
    bad["00037"] = "cut off"
    return list_shards(str(folder)), bad


def test_check_indexes_only_what_decodes_and_both_loaders_skip_the_rest(
    damaged_shards: tuple[list[str], dict[str, str]],
) -> None:
    pytest.importorskip("nvidia.dali")
    shards, bad = damaged_shards
    folder = Path(shards[0]).parent
    assert checked_with(shards) == set() and loader.resolve_backend("auto", shards) == "torch"
    with pytest.raises(DataError, match="data.backend=dali: the shards in .* were not checked with DALI's decoder"):
        loader.resolve_backend("dali", shards)

    assert main(["--index-only", str(folder), "--check", "--no-progress"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {e["key"]: e["shard"] for e in manifest["bad_samples"]} == {
        k: "00000.tar" if k < "00020" else "00001.tar" for k in bad
    }
    reasons = {e["key"]: e["error"] for e in manifest["bad_samples"]}
    assert reasons["00007"].startswith(("broken JPEG: ", "DALI's")) and reasons["00003"] == "empty file"
    assert reasons["00030"].startswith("no image member") and reasons["00037"] == "cut off by the end of the tar"
    good = {f"{i:05d}" for i in range(38)} - set(bad)
    assert [(e["name"], e["samples"]) for e in manifest["shards"]] == [("00000.tar", 17), ("00001.tar", 15)]
    assert len(good) == 32 and checked_with(shards) == {"pil", "dali"}
    assert loader.resolve_backend("auto", shards) == "dali" == loader.resolve_backend("dali", shards)

    first = Path(shards[0])
    assert main(["--index-only", str(first), "--no-progress"]) == 0  # re-indexing keeps the check's exclusions
    assert first.with_suffix(".idx").read_text().startswith("v1.2 17\n")

    views = moco_views("v2", 16)
    dali = loader.two_view_batches(
        "dali", StreamSpec(shards, views, 8, shuffle_buffer=16), workers=1, device=torch.device("cpu")
    )
    for _ in range(12):  # three epochs of the 32 good samples: no decode error stops the pipeline
        view1, view2, labels = next(dali)
        assert view2.shape == view1.shape
        assert view1.shape == (8, 3, 16, 16) and torch.isfinite(view1).all() and labels.min() >= 0
    assert dali.bad_samples == len(bad) == 6  # 00038-00039, lost with the tail, are in no listing
    stream = TwoViewStream(shards, views, 0, 1, shuffle_buffer=1)
    first_epoch = [sample["__key__"] for epoch, _, sample in _take(stream.raw_stream(), 33) if epoch == 0]
    assert sorted(first_epoch) == sorted(good)
    batches = two_view_loader(StreamSpec(shards, views, 8, shuffle_buffer=4))
    next(batches)
    assert batches.bad_samples == len(bad)  # left out by the check; nothing else fails to decode


def _take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def test_writer_checks_with_dali_too(tmp_path: Path) -> None:
    samples = [(f"k{i}", _noise_jpeg(i), i % 2) for i in range(6)]
    samples[4] = ("k4", _damaged_header(_noise_jpeg(4)), 0)
    shards = write_shards(samples, tmp_path, samples_per_shard=4, check=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checked_with"] == decoders() and checked_with([str(s) for s in shards]) == set(decoders())
    if "dali" in decoders():  # PIL decodes k4
        assert [e["key"] for e in manifest["bad_samples"]] == ["k4"]
        assert [e["samples"] for e in manifest["shards"]] == [4, 1]
    unchecked = write_shards(samples, tmp_path / "plain", samples_per_shard=4)
    assert checked_with([str(s) for s in unchecked]) == set()


@pytest.mark.slow
def test_pretraining_streams_checked_damaged_shards_through_dali(
    damaged_shards: tuple[list[str], dict[str, str]], tmp_path: Path, repo_root: Path
) -> None:
    pytest.importorskip("nvidia.dali")
    shards, bad = damaged_shards
    folder = Path(shards[0]).parent
    assert main(["--index-only", str(folder), "--check", "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(repo_root / "launchers" / "pretrain.py"),
        "--config",
        str(repo_root / "configs" / "demo.yaml"),
        f"--data.path={folder}",
        "--data.backend=dali",
        "--train.batch_size=8",
        "--moco.queue_size=16",
        "--train.max_steps=6",  # more than an epoch of the 32 good samples
        "--train.log_every=2",
        "--eval.every_steps=0",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["bad_samples"] == len(bad) for r in records)


def test_a_shard_with_nothing_that_decodes_stays_listed_and_is_passed_over(
    tmp_path: Path, demo_shards: dict[str, Path]
) -> None:
    pytest.importorskip("nvidia.dali")
    with tarfile.open(sorted(demo_shards["val"].glob("*.tar"))[0]) as tar:
        digits = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:8]
    with tarfile.open(tmp_path / "0.tar", "w") as tar:  # nothing in it decodes
        for i in range(2):
            _add(tar, f"bad{i}.jpg", KINDS["garbage"](b""))
    with tarfile.open(tmp_path / "1.tar", "w") as tar:
        for i, jpeg in enumerate(digits):
            _add(tar, f"good{i}.jpg", jpeg)
            _add(tar, f"good{i}.cls", b"3")
    assert main(["--index-only", str(tmp_path), "--check", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(e["name"], e["samples"]) for e in manifest["shards"]] == [("0.tar", 0), ("1.tar", 8)]
    assert main(["--index-only", str(tmp_path), "--no-progress"]) == 0  # a plain re-index passes over 0.tar too
    shards = list_shards(str(tmp_path))
    assert checked_with(shards) == {"pil", "dali"} and not (tmp_path / "0.idx").exists()
    dali = loader.two_view_batches(
        "dali", StreamSpec(shards, moco_views("v2", 16), 4, shuffle_buffer=4), workers=1, device=torch.device("cpu")
    )
    assert dali.samples_per_epoch == 8 and dali.bad_samples == 2
    labels = torch.cat([next(dali)[2] for _ in range(4)])
    assert labels.tolist() == [3] * 16
    torch_batches = two_view_loader(StreamSpec(shards, moco_views("v2", 16), 4, shuffle_buffer=4))
    assert torch.cat([next(torch_batches)[2] for _ in range(4)]).tolist() == [3] * 16
