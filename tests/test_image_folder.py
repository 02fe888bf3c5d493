"""ImageFolder trees and list files read in place: the index, the exactly-once split, resume, bad files, the
evaluation pass, the probe's and the launcher's inputs, and DALI over a checked list."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_scale.data import image_folder, loader
from moco_scale.data.augment import ViewSpec, moco_views
from moco_scale.data.dali import dali_available
from moco_scale.data.image_folder import FolderIndex, check_folder, read_list, scan_folder, write_list
from moco_scale.data.labelled import eval_loader, num_classes_of
from moco_scale.data.shards import DataError, StreamSpec, list_shards
from moco_scale.data.sources import list_inputs, open_source
from moco_scale.data.torch_loader import TwoViewStream, decode_sample, two_view_loader

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 120
BAD = {3: b"not an image", 17: None, 40: b""}  # garbage, a truncated JPEG (filled in below), zero bytes


def _demo_images(demo_shards: dict[str, Path], n: int) -> list[tuple[str, bytes, int]]:
    """The first ``n`` held-out demo digits (real 32 px JPEGs): ``(key, jpeg, label)``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in list_shards(str(demo_shards["val"])):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(key, s["jpg"], int(s["cls"])) for key, s in list(samples.items())[:n]]


def _write_tree(root: Path, images: list[tuple[str, bytes, int]], bad: dict[int, bytes | None]) -> list[Path]:
    """``root/digit_<label>/<key>.jpg`` for each image (the ``bad`` places' bytes replaced); the paths in order."""
    paths = []
    for i, (key, jpeg, label) in enumerate(images):
        path = root / f"digit_{label}" / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = bad.get(i, jpeg) if i in bad else jpeg
        path.write_bytes(jpeg[:60] if payload is None else payload)
        paths.append(path)
    (root / "digit_0" / "README.txt").write_text("not an image: left out of the index")
    return paths


@pytest.fixture(scope="module")
def digits(demo_shards: dict[str, Path]) -> list[tuple[str, bytes, int]]:
    return _demo_images(demo_shards, IMAGES)


@pytest.fixture
def tree(tmp_path: Path, digits: list[tuple[str, bytes, int]]) -> Path:
    _write_tree(tmp_path / "tree", digits, {})
    return tmp_path / "tree"


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 16 images, so that 120 images make 8 parts to split and shuffle (DataLoader workers fork)."""
    monkeypatch.setattr(image_folder, "PART_SIZE", 16)


def test_the_index_is_sorted_classes_and_paths_and_a_list_round_trips(
    tree: Path, digits: list[tuple[str, bytes, int]], tmp_path: Path
) -> None:
    index = scan_folder(tree)
    assert index.class_names == [f"digit_{d}" for d in range(10)]
    assert index.paths == sorted(index.paths, key=lambda p: (Path(p).parent.name, p))
    assert len(index.paths) == IMAGES and not any(p.endswith(".txt") for p in index.paths)
    expected = {f"{key}.jpg": label for key, _, label in digits}
    assert [expected[Path(p).name] for p in index.paths] == index.labels
    listed = tmp_path / "train.txt"
    write_list(index, listed)
    assert listed.read_text().splitlines()[0] == f"tree/{Path(index.paths[0]).relative_to(tree)} {index.labels[0]}"
    again = read_list(listed)
    assert [Path(p).resolve() for p in again.paths] == [Path(p).resolve() for p in index.paths]
    assert again.labels == index.labels and num_classes_of([str(listed)]) == 10 == num_classes_of([str(tree)])


def test_each_kind_of_input_is_recognised_and_bad_ones_are_one_line_errors(
    tree: Path, demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    assert list_inputs(str(tree)) == [str(tree)]
    assert list_inputs(str(demo_shards["val"])) == list_shards(str(demo_shards["val"]))
    listed = tmp_path / "list.txt"
    listed.write_text("tree/digit_1/a.jpg 1\nno-label-here\n")
    assert list_inputs(str(listed)) == [str(listed)]
    with pytest.raises(DataError, match=r"list.txt:2: expected '<path> <label>', got 'no-label-here'$"):
        open_source([str(listed)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.path: folder '.*empty' holds neither .tar shards nor class folders"):
        list_inputs(str(tmp_path / "empty"))
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images .* in its class folders"):
        open_source(list_inputs(str(tmp_path / "classes")))


@pytest.mark.parametrize("world", [2, 3])
def test_every_image_once_per_epoch_across_ranks_in_an_order_drawn_per_epoch(
    tree: Path, small_parts: None, world: int
) -> None:
    orders = {}
    per_rank = IMAGES // world
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(world):
            raw = TwoViewStream([str(tree)], moco_views("v2", 16), rank, world, seed=3, shuffle_buffer=10).raw_stream()
            mine = [next(raw) for _ in range(per_rank * (epoch + 1))][-per_rank:]
            assert {e for e, _, _ in mine} == {epoch}
            seen += [sample["__key__"] for _, _, sample in mine]
        assert len(seen) == len(set(seen)) == IMAGES - IMAGES % world
        orders[epoch] = seen
    assert orders[0] != orders[1]
    again = TwoViewStream([str(tree)], moco_views("v2", 16), 0, world, seed=3, shuffle_buffer=10).raw_stream()
    assert [next(again)[2]["__key__"] for _ in range(per_rank)] == orders[0][:per_rank]  # (seed, epoch) decides


def _batches(batches, n: int) -> list[torch.Tensor]:
    return [torch.cat([v1.flatten(1), v2.flatten(1), y[:, None]], 1) for v1, v2, y in (next(batches) for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted_and_resume_is_exact(
    tmp_path: Path, digits: list[tuple[str, bytes, int]], small_parts: None, workers: int
) -> None:
    paths = _write_tree(tmp_path / "tree", digits, BAD)
    listed = tmp_path / "list.txt"
    write_list(scan_folder(tmp_path / "tree"), listed)
    paths[60].unlink()  # listed, then gone: unreadable
    stream = StreamSpec([str(listed)], moco_views("v2", 16), 8, rank=1, world_size=2, seed=5, shuffle_buffer=12)
    batches = two_view_loader(stream, workers)
    seen = _batches(batches, 5)
    state = batches.state_dict()
    seen += _batches(batches, 12)  # past the end of this rank's first epoch of 60 places
    assert batches.bad_samples >= 1  # this rank's half holds at least one of the 4 bad places, whichever it is
    resumed = _batches(two_view_loader(stream, workers, state=state), 12)
    for a, b in zip(seen[5:], resumed, strict=True):
        assert torch.equal(a, b)
    bad = 0
    for rank in (0, 1):  # one epoch of each rank's places: every bad one is bad once over the two
        raw = TwoViewStream([str(listed)], stream.views, rank, 2, seed=5, shuffle_buffer=12).raw_stream()
        bad += sum(decode_sample(next(raw)[2]) is None for _ in range(IMAGES // 2))
    assert bad == len(BAD) + 1


def _one_pass(inputs: list[str], world: int, workers: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for rank in range(world):
        for x, y in eval_loader(inputs, 24, batch, rank, world, workers):
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels)


def test_the_evaluation_pass_reads_every_image_once_in_index_order(
    tmp_path: Path, digits: list[tuple[str, bytes, int]], small_parts: None
) -> None:
    _write_tree(tmp_path / "tree", digits, BAD)
    index = scan_folder(tmp_path / "tree")
    good = [label for path, label in zip(index.paths, index.labels, strict=True) if Path(path).stat().st_size > 60]
    images, labels = _one_pass([str(tmp_path / "tree")], 1, 0, 16)
    assert labels.tolist() == good and images.shape == (len(good), 3, 24, 24)
    for world, workers, batch in [(2, 2, 7), (3, 0, 16)]:
        split_images, split_labels = _one_pass([str(tmp_path / "tree")], world, workers, batch)
        assert torch.equal(split_labels, labels) and torch.equal(split_images, images)


def test_the_check_writes_a_list_of_what_decodes_and_dali_streams_it_exactly_once(
    tmp_path: Path, digits: list[tuple[str, bytes, int]], small_parts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path / "tree", digits, BAD)
    monkeypatch.setattr(loader, "dali_available", lambda: True)
    with pytest.raises(DataError, match=r"data.backend=dali: .*tree is not a checked list.*image_folder"):
        loader.resolve_backend("dali", [str(tmp_path / "tree")])
    monkeypatch.setattr(loader, "dali_available", dali_available)
    assert loader.resolve_backend("auto", [str(tmp_path / "tree")]) == "torch"
    checked = tmp_path / "checked.txt"
    index = check_folder(str(tmp_path / "tree"), checked)
    assert len(index.paths) == IMAGES - len(BAD) and len(index.bad) == len(BAD)
    assert open_source([str(checked)]).left_out == len(BAD)
    if "dali" not in index.checked_with:
        pytest.skip("DALI is not installed: the checked list is PIL's only")
    from moco_scale.data.dali import DaliTwoViewLoader, build_two_view_pipeline, cls_labels

    assert loader.resolve_backend("auto", [str(checked)]) == "dali"
    expected = dict(zip(index.paths, index.labels, strict=True))
    epochs = []
    for rank in range(2):
        unflipped = tuple(ViewSpec(v.size, replace(v.aug, flip_p=0.0)) for v in moco_views("v2", 16))
        stream = StreamSpec([str(checked)], unflipped, 9, rank, 2, seed=3)
        dali = DaliTwoViewLoader(stream, num_threads=1)
        assert dali.bad_samples == len(BAD) and next(dali)[0].shape == (9, 3, 16, 16)
        dali.close()
        pipe = build_two_view_pipeline(stream, device_id=None, num_threads=1)  # its outputs name their files
        pipe.build()
        n, files = dali.samples_per_epoch, []
        while len(files) < 2 * n:
            crop1, *_, cls = pipe.run()  # an unflipped crop keeps its file's name (fn.flip drops it)
            files += [crop1[i].source_info() for i in range(len(crop1))]
            labels = cls_labels(cls).tolist()
            assert labels == [expected[f] for f in files[-len(labels) :]]
        epochs.append([files[:n], files[n : 2 * n]])
    for first, second in zip(*epochs, strict=True):  # rank 0's and rank 1's share of an epoch
        assert not set(first) & set(second) and set(first) | set(second) == set(index.paths)
    assert epochs[0][0] != epochs[0][1]  # reshuffled after each epoch


def test_a_labelled_list_without_class_names_counts_its_labels(tmp_path: Path) -> None:
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image, format="PNG")
    (tmp_path / "a.png").write_bytes(image.getvalue())
    write_list(FolderIndex([str(tmp_path / "a.png")] * 3, [0, 4, 2]), tmp_path / "l.txt")
    assert num_classes_of([str(tmp_path / "l.txt")]) == 5


def _launch(script: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launchers" / script), f"--config={ROOT / 'configs' / 'demo.yaml'}", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_pretraining_its_knn_monitor_and_the_probe_take_a_folder_and_a_list(
    tmp_path: Path, digits: list[tuple[str, bytes, int]]
) -> None:
    """The launcher trains on a tree with bad files, the kNN monitor banks the tree and classifies a list of
    another tree, and the probe trains on the tree and measures on the list: no shards anywhere."""
    _write_tree(tmp_path / "train", digits[:80], BAD)
    _write_tree(tmp_path / "held", digits[80:], {})
    write_list(scan_folder(tmp_path / "held"), tmp_path / "held.txt")
    run_dir = tmp_path / "run"
    inputs = [f"--data.path={tmp_path / 'train'}", f"--eval.val_path={tmp_path / 'held.txt'}"]
    result = _launch(
        "pretrain.py",
        *inputs,
        "--train.max_steps=2",
        "--eval.every_steps=2",
        "--moco.queue_size=64",
        "--checkpoint.every_steps=2",
        "--train.batch_size=16",
        "--train.progress=false",
        f"--train.run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 2]
    assert "done: 2 steps" in result.stdout
    probe_dir = tmp_path / "probe"
    result = _launch(
        "linear_probe.py",
        f"--probe.init={run_dir}",
        f"--probe.train_path={tmp_path / 'train'}",
        f"--eval.val_path={tmp_path / 'held.txt'}",  # the probe's val_path falls back to the monitor's
        "--probe.max_steps=2",
        "--train.progress=false",
        f"--probe.run_dir={probe_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((probe_dir / "linear_probe.json").read_text())
    assert record["num_classes"] == 10 and record["val_samples"] == IMAGES - 80
