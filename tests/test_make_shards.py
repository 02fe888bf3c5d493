"""The shard writer CLI on real JPEGs (tiles of scikit-learn's sample photos), read back by tarfile,
webdataset and DALI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco_scale.data.decode_check import decoders
from moco_scale.data.make_shards import main
from moco_scale.data.shards import DataError, write_index, write_shards

CLASSES = ["bird", "cat", "dog"]
SHARD_SIZE = 4


def _read_tars(paths: list[Path]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def _check_index(tar_path: Path) -> list[dict[str, bytes]]:
    """Parse a ``.idx`` by hand and check each entry against the tar's bytes; returns the samples it lists."""
    lines = tar_path.with_suffix(".idx").read_text().splitlines()
    version, count = lines[0].split()
    assert version == "v1.2" and int(count) == len(lines) - 1
    data = tar_path.read_bytes()
    members = _read_tars([tar_path])
    samples = []
    for line in lines[1:]:
        fields = line.split()
        sample = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]
            assert name.endswith(f".{ext}") and data[offset : offset + size] == members[name]
            sample[ext] = members[name]
        samples.append(sample)
    return samples


def _dali_read(shards: list[Path], ext: list[str]) -> list[tuple[bytes, ...]]:
    """Every sample of ``shards`` as DALI's CPU webdataset reader returns it, through their ``.idx`` files."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe() -> tuple:
        return tuple(
            fn.readers.webdataset(
                paths=[str(s) for s in shards],
                index_paths=[str(s.with_suffix(".idx")) for s in shards],
                ext=ext,
                missing_component_behavior="error",
            )
        )

    pipeline = pipe()
    pipeline.build()
    (total,) = pipeline.epoch_size().values()
    return [tuple(np.asarray(out[0]).tobytes() for out in pipeline.run()) for _ in range(total)]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 12 JPEG tiles and a PNG in 3 classes, plus a corrupt and a zero-byte ``.jpg``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for t in range(4):
            tile = photos[(c + t) % 2][60 * t : 60 * (t + 1), 80 * c : 80 * (c + 1)]
            Image.fromarray(tile).save(root / name / f"{name}_{t}.jpg", quality=90)
    Image.fromarray(photos[0][:60, :80]).save(root / "bird" / "bird_png.png")
    (root / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def built(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    assert main([str(src), str(out), "--shard-size", str(SHARD_SIZE), "--workers", "1", "--no-progress"]) == 0
    return out


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def test_round_trip_byte_identical_with_labels(src: Path, built: Path) -> None:
    import webdataset as wds

    samples = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in _shards(built)], shardshuffle=False)}
    jpegs = sorted(p for p in src.glob("*/*.jpg") if p.stem not in {"bad", "empty"})
    assert len(jpegs) == 12 and set(samples) == {p.stem for p in jpegs} | {"bird_png"}
    for path in jpegs:
        sample = samples[path.stem]
        assert sample["jpg"] == path.read_bytes() and int(sample["cls"]) == CLASSES.index(path.parent.name)
    png = Image.open(io.BytesIO(samples["bird_png"]["jpg"]))  # re-encoded
    assert png.format == "JPEG" and png.size == (80, 60) and samples["bird_png"]["cls"] == b"0"
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["class_names"] == CLASSES and manifest["samples"] == 13 and manifest["inputs"] == 15


def test_corrupt_and_empty_files_are_skipped_and_listed(src: Path, built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    bad = {Path(entry["path"]).name: entry["error"] for entry in manifest["bad_samples"]}
    assert bad == {"bad.jpg": "not an image format PIL can identify", "empty.jpg": "empty file"}
    assert not any(name.startswith(("bad.", "empty.")) for name in _read_tars(_shards(built)))
    assert manifest["checked_with"] == decoders()  # with "dali", lets data.backend=auto pick DALI for these shards


def test_shard_size_is_respected_and_shards_follow_input_order(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    # inputs in order: bird_0-3, bird_png, bad, cat_0-3, dog_0-3, empty; shard i: the good ones of inputs 4i..4i+3
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("shard-000000.tar", 4),
        ("shard-000001.tar", 3),
        ("shard-000002.tar", 4),
        ("shard-000003.tar", 2),
    ]
    first = [n for n in _read_tars([built / "shard-000000.tar"]) if n.endswith(".jpg")]
    assert first == ["bird_0.jpg", "bird_1.jpg", "bird_2.jpg", "bird_3.jpg"]
    assert sorted(p.name for p in built.iterdir()) == sorted(
        ["manifest.json"] + [f"shard-00000{i}.{ext}" for i in range(4) for ext in ("tar", "idx")]
    )  # no temporary files left behind
    for shard in _shards(built):
        assert len(_check_index(shard)) == len(_read_tars([shard])) // 2


def test_dali_reads_the_shards_through_their_index_files(built: Path) -> None:
    pytest.importorskip("nvidia.dali")
    shards = _shards(built)
    members = _read_tars(shards)
    keys = [name[: -len(".jpg")] for name in members if name.endswith(".jpg")]
    expected = [(members[f"{k}.jpg"], members[f"{k}.cls"]) for k in keys]
    assert _dali_read(shards, ["jpg", "cls"]) == expected


def test_second_run_is_a_no_op_and_force_rewrites(
    src: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    args = [str(src), str(out), "--shard-size", str(SHARD_SIZE), "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert main([*args, "--force"]) == 0
    assert "wrote 13 samples in 4 shards" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {name: data for name, (_, data) in before.items()}
    assert main([str(src), str(out), "--shard-size", "6", "--no-progress"]) == 0  # new settings: rewritten
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / "manifest.json").read_text())["samples"] == 13
    other = tmp_path / "other"
    shutil.copytree(src / "cat", other / "cat")
    assert main([str(other), str(out), "--no-progress"]) == 2  # shards of another source stay...
    assert "holds shards of another source" in capsys.readouterr().err
    assert main([str(other), str(out), "--no-progress", "--force"]) == 0  # ...unless forced
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.idx", "shard-000000.tar"]


def test_worker_count_does_not_change_the_shards(src: Path, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(src), str(out), "--shard-size", str(SHARD_SIZE), "--workers", "2", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in built.iterdir()}


def test_list_file_input(src: Path, tmp_path: Path) -> None:
    lists = src / "lists"  # relative paths resolve against the list file's folder
    lists.mkdir(exist_ok=True)
    lines = ["# path label", "../cat/cat_1.jpg\t7", "", f"{src / 'dog' / 'dog_2.jpg'} 3", "../bird/bird_0.jpg  5"]
    (lists / "train.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main([str(lists / "train.txt"), str(out), "--no-progress", "--prefix", "train"]) == 0
    members = _read_tars([out / "train-000000.tar"])
    assert list(members) == ["cat_1.jpg", "cat_1.cls", "dog_2.jpg", "dog_2.cls", "bird_0.jpg", "bird_0.cls"]
    assert members["dog_2.jpg"] == (src / "dog" / "dog_2.jpg").read_bytes()
    assert [members[f"{k}.cls"] for k in ("cat_1", "dog_2", "bird_0")] == [b"7", b"3", b"5"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] is None and manifest["samples"] == 3 and manifest["bad_samples"] == []


def _plain_shards(src: Path, folder: Path) -> list[Path]:
    """Two img2dataset-like shards (``jpg`` + ``json`` + ``cls``) written with plain ``tarfile``, without index."""
    jpegs = sorted(src.glob("*/*_[0-3].jpg"))
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, path in enumerate(jpegs[6 * s : 6 * s + 6]):
                key = f"{6 * s + i:09d}"
                tar.add(path, f"{key}.jpg")
                for ext, payload in (("json", json.dumps({"url": path.name}).encode()), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return sorted(folder.glob("*.tar"))


def test_index_only_on_plain_tarfile_shards(src: Path, tmp_path: Path) -> None:
    shards = _plain_shards(src, tmp_path)
    assert main(["--index-only", str(tmp_path), "--no-progress"]) == 0
    assert [len(_check_index(s)) for s in shards] == [6, 6]
    shards[0].with_suffix(".idx").unlink()
    assert main(["--index-only", str(tmp_path / "*.tar"), "--no-progress", "--workers", "2"]) == 0
    assert [len(_check_index(s)) for s in shards] == [6, 6]
    assert main(["--index-only", str(tmp_path / "nothing-*.tar"), "--no-progress"]) == 2


def test_dali_reads_index_only_shards(src: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    shards = _plain_shards(src, tmp_path)
    assert main(["--index-only", str(tmp_path), "--no-progress"]) == 0
    got = _dali_read(shards, ["jpg", "json"])
    assert [jpeg for jpeg, _ in got] == [p.read_bytes() for p in sorted(src.glob("*/*_[0-3].jpg"))]
    assert json.loads(got[0][1]) == {"url": "bird_0.jpg"}


def test_write_shards_writes_index_files(tmp_path: Path, src: Path) -> None:
    samples = [(p.stem, p.read_bytes(), 1) for p in sorted(src.glob("*/*_[0-3].jpg"))]
    shards = write_shards(samples, tmp_path, samples_per_shard=5, prefix="t")
    assert [len(_check_index(s)) for s in shards] == [5, 5, 2]
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(DataError, match="holds no samples"):
        write_index(empty)


def _missing(tmp: Path) -> tuple[Path, Path]:
    return tmp / "missing", tmp / "out"


def _no_images(tmp: Path) -> tuple[Path, Path]:
    (tmp / "src" / "cls").mkdir(parents=True)
    (tmp / "src" / "cls" / "notes.txt").write_text("x")
    return tmp / "src", tmp / "out"


def _out_is_a_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "out").write_text("x")
    return tmp, tmp / "out"


@pytest.mark.parametrize(
    ("setup", "message"),
    [(_missing, "does not exist"), (_no_images, "holds no images"), (_out_is_a_file, "exists and is not a folder")],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, repo_root: Path, setup: Callable[[Path], tuple[Path, Path]], message: str
) -> None:
    src, out = setup(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "moco_scale.data.make_shards", str(src), str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("make_shards: error:")
