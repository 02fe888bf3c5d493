"""Faults on the data side: fuzzed images of several formats through every torch loader, signals to the loaders'
workers, shards changed after indexing, and the decompression-bomb PNG in the shard check."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_scale import train
from moco_scale.data.augment import moco_views
from moco_scale.data.decode_check import decode_errors, decoders
from moco_scale.data.labelled import eval_loader, linear_eval_stream, train_loader
from moco_scale.data.make_shards import main as make_shards
from moco_scale.data.shards import (
    DataError,
    StreamSpec,
    checked_with,
    list_shards,
    write_index,
    write_manifest,
    write_shards,
)
from moco_scale.data.sources import count_samples
from moco_scale.data.torch_loader import StreamBatches, two_view_loader

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "gif": "GIF", "tiff": "TIFF", "webp": "WEBP"}


def _real_images() -> list[tuple[Image.Image, int]]:
    """60 of scikit-learn's digits at 24 px (labels 0-9) and 60 crops of its two sample photos at 40x30 (10, 11)."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    images = [
        (Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L").resize((24, 24)).convert("RGB"), int(label))
        for pixels, label in zip(digits.images[:60], digits.target[:60], strict=True)
    ]
    for i, photo in enumerate(load_sample_images().images):
        images += [
            (Image.fromarray(photo[20 * t : 20 * t + 96, 30 * t : 30 * t + 128]).resize((40, 30)), 10 + i)
            for t in range(30)
        ]
    return images


def _size_fields(data: bytes, ext: str) -> list[tuple[int, str]]:
    """(offset, struct format) of the width and height fields of an encoded image; none known for WebP."""
    if ext == "png":
        return [(16, ">I"), (20, ">I")]
    if ext == "bmp":
        return [(18, "<i"), (22, "<i")]
    if ext == "gif":
        return [(6, "<H"), (8, "<H")]
    if ext == "jpg":
        frame = data.find(b"\xff\xc0")
        return [(frame + 5, ">H"), (frame + 7, ">H")]
    if ext == "tiff":  # PIL writes little-endian TIFF: the ImageWidth and ImageLength entries of the first IFD
        ifd = struct.unpack_from("<I", data, 4)[0]
        entries = [ifd + 2 + 12 * i for i in range(struct.unpack_from("<H", data, ifd)[0])]
        return [
            (entry + 8, "<H" if struct.unpack_from("<H", data, entry + 2)[0] == 3 else "<I")
            for entry in entries
            if struct.unpack_from("<H", data, entry)[0] in (256, 257)
        ]
    return []


def _corrupt(data: bytes, ext: str, rng: random.Random) -> bytes:
    """Bit flips, a truncation, a zeroed range, or width and height rewritten (PNG's header CRC made valid again)."""
    out = bytearray(data)
    kind = rng.choice(["flip", "truncate", "zero", "size"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    elif kind == "zero":
        start = rng.randrange(len(out))
        out[start : start + 64] = bytes(len(out[start : start + 64]))
    else:
        for offset, fmt in _size_fields(data, ext) or [(rng.randrange(len(out) - 4), "<I")]:
            top = 0xFFFF if fmt.endswith("H") else 0x7FFF_FFFF
            value = rng.choice([0, 1, rng.randint(2, 300), rng.randint(30_000, 65_535), rng.randint(0, top)])
            struct.pack_into(fmt, out, offset, min(value, top))
        if ext == "png":
            struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _bomb_png(width: int = 20_000, height: int = 10_000) -> bytes:
    """A valid 8x8 PNG whose header (CRC included) claims ``width x height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _pil_fails(payload: bytes) -> str | None:
    """Reference: the exception type PIL raises on a full decode to RGB (its bomb warning counted as one), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
                image.convert("RGB")
    except Exception as e:
        return type(e).__name__
    return None


def _write_tar(path: Path, samples: list[tuple[str, str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, payload, label in samples:
            for name, data in ((f"{key}.{ext}", payload), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_index(path)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[tuple[str | None, int]]]:
    """720 real images (120 in each of 6 formats), about 360 of them corrupted at random (seed 1) and two replaced
    by bomb PNGs (20000x10000, and 12000x10000, which PIL only warns about), in 6 shards of 120 with their index
    and manifest. Returns the shards and, in the shards' order, each sample's reference decode failure (None when
    it decodes) and label."""
    rng = random.Random(1)
    samples = []
    for i, (image, label) in enumerate(_real_images()):
        for ext, fmt in FORMATS.items():
            buffer = io.BytesIO()
            image.save(buffer, fmt)
            payload = buffer.getvalue()
            if rng.random() < 0.5:
                payload = _corrupt(payload, ext, rng)
            samples.append((f"{i:03d}{ext}", ext, payload, label))
    samples[7] = (samples[7][0], "png", _bomb_png(), samples[7][3])
    samples[9] = (samples[9][0], "png", _bomb_png(12_000, 10_000), samples[9][3])  # PIL only warns: 360 MB to load
    rng.shuffle(samples)
    folder = tmp_path_factory.mktemp("fuzzed")
    names = [f"f{s}.tar" for s in range(6)]
    for name, start in zip(names, range(0, 720, 120), strict=True):
        _write_tar(folder / name, samples[start : start + 120])
    write_manifest(folder, [(name, 120) for name in names], None)
    return list_shards(str(folder)), [(_pil_fails(payload), label) for _, _, payload, label in samples]


def test_the_fuzzed_images_fail_in_many_ways(fuzzed: tuple[list[str], list[tuple[str | None, int]]]) -> None:
    failures = [error for error, _ in fuzzed[1] if error]
    assert 200 < len(failures) < 360  # some corruptions leave an image that still decodes
    assert {"DecompressionBombError", "DecompressionBombWarning", "SyntaxError"} <= set(failures)  # not OSErrors


def _bad_in_first_epoch(batches: StreamBatches, readers: int) -> int:
    """The bad samples among every place of epoch 0, from the positions of batches of one sample: when a reader's
    first epoch-1 sample is served at place ``served`` of that epoch with ``bad`` counted, ``served - 1`` of those
    were epoch 1's."""
    first_epoch: dict[int, int] = {}
    while len(first_epoch) < readers:
        next(batches)
        for reader, (epoch, served, bad) in enumerate(batches.positions):
            if epoch == 1 and reader not in first_epoch:
                first_epoch[reader] = bad - (served - 1)
    return sum(first_epoch.values())


def test_every_loader_skips_and_counts_every_image_pil_cannot_decode(
    fuzzed: tuple[list[str], list[tuple[str | None, int]]],
) -> None:
    """Two-view loader and the linear probe's training loader for one epoch, the evaluation loader for one pass,
    each with 2 workers: nothing raises, and the bad samples are exactly those the reference decode fails on."""
    shards, reference = fuzzed
    failed = sum(error is not None for error, _ in reference)
    two_view = two_view_loader(StreamSpec(shards, moco_views("v2", 16), 1, seed=1, shuffle_buffer=50), workers=2)
    assert _bad_in_first_epoch(two_view, 2) == failed
    probe = train_loader(linear_eval_stream(shards, 16, 1, seed=1, shuffle_buffer=50), workers=2)
    assert _bad_in_first_epoch(probe, 2) == failed
    passes = eval_loader(shards, 16, 32, 0, 1, workers=2)
    labels = torch.cat([labels for _, labels in passes])
    assert passes.bad_samples == failed
    assert labels.tolist() == [label for error, label in reference if error is None]


def _signal_workers(workers: list) -> None:
    """SIGUSR1, SIGTERM and SIGINT to each worker process, as ``kill -- -PGID`` and SLURM's --signal deliver them."""
    for worker in workers:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)


def test_loader_workers_outlive_the_signals_a_job_gets(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["val"]))
    for batches in (
        two_view_loader(StreamSpec(shards, moco_views("v2", 16), 4, shuffle_buffer=8), workers=2),
        train_loader(linear_eval_stream(shards, 16, 4, shuffle_buffer=8), workers=2),
    ):
        next(batches), next(batches)  # one batch from each worker: both have started
        _signal_workers(batches._batches._workers)
        for _ in range(4):
            assert len(next(batches)[-1]) == 4
    one_pass = iter(eval_loader(shards, 16, 16, 0, 1, workers=2).loader)
    next(one_pass), next(one_pass)
    _signal_workers(one_pass._workers)
    assert sum(len(labels) for _, labels, _ in one_pass) == 300 - 32


def test_a_shard_changed_after_indexing_is_a_one_line_error_before_anything_starts(
    tmp_path: Path, demo_shards: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    with tarfile.open(list_shards(str(demo_shards["val"]))[0]) as tar:
        digits = [(m.name[:-4], tar.extractfile(m).read(), 3) for m in tar.getmembers() if m.name.endswith(".jpg")]
    folder = tmp_path / "shards"
    shards = [str(s) for s in write_shards(digits[:30], folder, samples_per_shard=10)]
    assert count_samples(shards) == 30
    cut = Path(shards[1])
    cut.write_bytes(cut.read_bytes()[:4096])  # a copy that stopped early, or a shard rewritten in place
    message = (
        rf"^{re.escape(str(cut))} is 4096 bytes, but manifest.json recorded \d+: it changed after it was indexed; "
        rf"re-index the folder: python -m moco_scale.data.make_shards --index-only {re.escape(str(folder))} --check$"
    )
    for read in (count_samples, checked_with, lambda s: two_view_loader(StreamSpec(s, moco_views("v2", 16), 4))):
        with pytest.raises(DataError, match=message):
            read(shards)
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            config=str(ROOT / "configs" / "demo.yaml"),
            **{"data.path": str(folder), "eval.every_steps": 0, "train.run_dir": str(tmp_path / "run")},
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and re.search(message[1:], err[len("error: ") :]), err
    assert make_shards(["--index-only", str(folder), "--check", "--no-progress"]) == 0  # what the message says
    assert count_samples(shards) == 21  # the one sample the cut left whole

    manifest = folder / "manifest.json"  # an older manifest, without sizes: the .idx's count is compared instead
    content = json.loads(manifest.read_text())
    content["shards"] = [{"name": e["name"], "samples": e["samples"]} for e in content["shards"]]
    manifest.write_text(json.dumps(content))
    assert count_samples(shards) == 21
    index = Path(shards[0]).with_suffix(".idx")
    index.write_text(index.read_text().replace("v1.2 10\n", "v1.2 9\n", 1))
    with pytest.raises(DataError, match=r"shard-000000.tar has 9 samples in its .idx, but manifest.json lists 10: "):
        count_samples(shards)
    manifest.write_text(json.dumps(content)[:-20])
    with pytest.raises(DataError, match=r"manifest.json is unreadable \(JSONDecodeError: .*\); re-index the folder"):
        count_samples(shards)


def test_the_shard_check_leaves_out_the_bomb_png_and_dali_streams_the_rest(
    tmp_path: Path, demo_shards: dict[str, Path]
) -> None:
    bomb = _bomb_png()
    assert decode_errors([bomb], ["pil"])[0].startswith("DecompressionBombError")
    with tarfile.open(list_shards(str(demo_shards["val"]))[0]) as tar:
        digits = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:8]
    _write_tar(tmp_path / "0.tar", [(f"d{i}", "jpg", d, 1) for i, d in enumerate(digits)] + [("bomb", "png", bomb, 2)])
    assert make_shards(["--index-only", str(tmp_path), "--check", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["key"] for e in manifest["bad_samples"]] == ["bomb"] and manifest["shards"][0]["samples"] == 8
    if "dali" not in decoders():
        pytest.skip("DALI is not installed: only PIL checks")
    from moco_scale.data.loader import two_view_batches

    stream = StreamSpec([str(tmp_path / "0.tar")], moco_views("v2", 16), 4, shuffle_buffer=4)
    dali = two_view_batches("dali", stream, workers=1, device=torch.device("cpu"))
    assert torch.cat([next(dali)[2] for _ in range(6)]).tolist() == [1] * 24 and dali.bad_samples == 1
