"""Two-view loading throughput: DALI on the CPU and the torch fallback against fb/moco's ImageFolder loader.

    python benchmarks/data_throughput.py [--size 224] [--images 512] [--batch 32] [--workers 2] [--batches N]
                                         [--warmup N] [--rounds N] [--json PATH] [--smoke]

All three loaders read the same JPEGs and produce both views of MoCo v2's augmentation at ``--size``:

- ``dali``: ``DaliTwoViewLoader(..., device_id=None, num_threads=workers)`` over WebDataset shards
  (decode and augmentation on the CPU in DALI's thread pool);
- ``torch``: ``two_view_loader(..., workers=workers)``, the webdataset fallback (``batch_augment``), over the
  same shards;
- ``dali-folder`` and ``torch-folder``: the same two loaders reading the ImageFolder tree below in place (DALI
  through the list that ``moco_scale.data.image_folder``'s check writes, untimed);
- ``reference``, written here the way fb/moco's ``main_moco.py`` loads data: ``ImageFolder`` over the
  same JPEGs as a class-folder tree, a two-crops transform around the PIL v2 augmentation (PIL
  Gaussian blur with ``radius = sigma``), in a ``DataLoader(num_workers=workers, shuffle=True,
  drop_last=True)``. One deviation: ``persistent_workers=True``, since the benchmark's epochs are a
  few batches long and fb/moco's per-epoch worker restart is negligible over an ImageNet epoch.

The photos are random crops (60-100% of each side) of scikit-learn's two sample photos (427x640),
resized to 400x300 (a quarter of them 300x400) and saved as JPEG quality 90; labels say which photo.

Only one loader lives at a time: each round builds a loader, pulls ``--warmup`` untimed batches
(worker start-up, pipeline build, first shuffle-buffer fill), times ``--batches`` batches, and shuts
it down, so no loader prefetches in the background while another is timed. The rounds rotate the
order of the loaders, and the median over rounds is reported. "Per worker" divides by ``--workers``:
DALI threads or DataLoader worker processes.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets

from moco_scale.data.augment import moco_views
from moco_scale.data.image_folder import check_folder
from moco_scale.data.shards import StreamSpec, write_shards
from moco_scale.data.torch_loader import two_view_loader

try:
    from benchmarks._common import environment, format_table, median, spread, write_json
    from benchmarks.reference_data import two_crops
except ModuleNotFoundError:  # run as ``python benchmarks/data_throughput.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, write_json
    from reference_data import two_crops

SEED = 0
SHARD_SIZE = 128
LANDSCAPE, PORTRAIT = (400, 300), (300, 400)  # (width, height)
PORTRAIT_P = 0.25
JPEG_QUALITY = 90
LOADERS = ("dali", "torch", "dali-folder", "torch-folder", "reference")
DESCRIPTIONS = {
    "dali": "DaliTwoViewLoader(device_id=None, num_threads=workers), WebDataset shards",
    "torch": "two_view_loader(workers=workers), webdataset, crops per image and augmentation per batch, same shards",
    "dali-folder": "DaliTwoViewLoader over the ImageFolder tree's checked list (fn.readers.file)",
    "torch-folder": "two_view_loader over the ImageFolder tree, read in place",
    "reference": "fb/moco: ImageFolder + TwoCropsTransform(PIL v2 aug), DataLoader(shuffle=True)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=224, help="side of each view")
    parser.add_argument("--images", type=int, default=512, help="JPEGs in the data set")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches after each loader's start")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the loaders; the median is reported")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="32 images at 64 px, batch 8, 2 batches: for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.batch, args.batches, args.warmup, args.rounds = 32, 64, 8, 2, 1, 1
    if args.workers < 1:
        parser.error("--workers must be at least 1 (DALI needs a thread)")
    if args.images < args.batch:
        parser.error("--images must be at least --batch")
    return args


def make_photos(count: int, seed: int = SEED) -> tuple[list[tuple[str, bytes, int]], list[str]]:
    """``count`` ``(key, jpeg_bytes, label)`` crops of scikit-learn's sample photos, and the class names."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    names = [Path(f).stem for f in photos.filenames]  # china, flower
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        label = i % len(names)
        photo = Image.fromarray(photos.images[label])
        width, height = photo.size
        crop_w, crop_h = round(width * rng.uniform(0.6, 1.0)), round(height * rng.uniform(0.6, 1.0))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        out_size = PORTRAIT if rng.random() < PORTRAIT_P else LANDSCAPE
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(out_size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        samples.append((f"img{i:06d}", buffer.getvalue(), label))
    return samples, names


def write_dataset(samples: list[tuple[str, bytes, int]], names: list[str], root: Path) -> dict[str, list[str]]:
    """The same JPEGs as an ImageFolder tree (``root/folder/<class>/<key>.jpg``), its checked list and WebDataset
    shards: each loader's ``inputs`` by name (the reference's: the tree)."""
    folder = root / "folder"
    for key, jpeg, label in samples:
        target = folder / names[label] / f"{key}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(jpeg)
    shards = [str(p) for p in write_shards(samples, root / "shards", samples_per_shard=SHARD_SIZE, class_names=names)]
    check_folder(str(folder), root / "checked.txt")
    folders = {"dali-folder": [str(root / "checked.txt")], "torch-folder": [str(folder)], "reference": [str(folder)]}
    return {"dali": shards, "torch": shards, **folders}


def endless(loader: DataLoader) -> Iterator[object]:
    """A DataLoader's batches over epoch after epoch (its persistent workers carry over)."""
    while True:
        yield from loader


def build_loader(name: str, inputs: list[str], args: argparse.Namespace) -> Iterator[object]:
    views = moco_views("v2", args.size)
    if name.startswith("dali"):
        from moco_scale.data.dali import DaliTwoViewLoader

        return DaliTwoViewLoader(StreamSpec(inputs, views, args.batch, seed=SEED), num_threads=args.workers)
    if name.startswith("torch"):
        return two_view_loader(StreamSpec(inputs, views, args.batch, seed=SEED), args.workers)
    dataset = datasets.ImageFolder(inputs[0], two_crops(views))
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
    )
    return endless(loader)


def check_batch(name: str, batch: object, args: argparse.Namespace) -> None:
    """Both views of every sample are there, at the right size."""
    views = batch[0] if name == "reference" else batch[:2]
    shape = (args.batch, 3, args.size, args.size)
    if len(views) != 2 or any(tuple(v.shape) != shape for v in views):
        raise RuntimeError(f"{name}: expected two views of shape {shape}, got {[tuple(v.shape) for v in views]}")


def time_one(name: str, inputs: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Build a loader, warm it up, time ``args.batches`` batches, shut it down."""
    t_start = time.perf_counter()
    loader = build_loader(name, inputs, args)
    for _ in range(args.warmup):
        check_batch(name, next(loader), args)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - t0
    if hasattr(loader, "close"):  # the reference's generator: drops its DataLoader iterator, stopping the workers
        loader.close()
    del loader
    gc.collect()
    return {
        "samples_per_s": args.batches * args.batch / seconds,
        "timed_s": seconds,
        "startup_and_warmup_s": t0 - t_start,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    env = environment()
    try:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    except ImportError:
        sys.exit("data_throughput: NVIDIA DALI is not installed (pip install -e '.[dali]')")
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="moco_throughput_") as tmp:
        t0 = time.perf_counter()
        samples, names = make_photos(args.images)
        inputs = write_dataset(samples, names, Path(tmp))
        jpeg_bytes = sum(len(s[1]) for s in samples)
        print(
            f"Data loading throughput: {args.images} JPEGs ({LANDSCAPE[0]}x{LANDSCAPE[1]}, "
            f"{PORTRAIT_P:.0%} {PORTRAIT[0]}x{PORTRAIT[1]}, quality {JPEG_QUALITY}, mean "
            f"{jpeg_bytes / len(samples) / 1e3:.1f} kB) in {len(inputs['dali'])} shards + an ImageFolder tree, "
            f"written in {time.perf_counter() - t0:.1f} s; MoCo v2 views at {args.size} px, batch {args.batch}, "
            f"{args.workers} workers; {args.rounds} rounds x {args.batches} batches after {args.warmup} warm-up; "
            f"torch {env['torch']}, torchvision {torchvision.__version__}, DALI {dali_version}, {env['cpu']}, "
            f"{env['nproc']} cores"
        )
        for r in range(args.rounds):
            order = LOADERS[r % len(LOADERS) :] + LOADERS[: r % len(LOADERS)]
            result = {name: time_one(name, inputs[name], args) for name in order}
            rounds.append(result)
            print(f"round {r + 1}: " + ", ".join(f"{n} {result[n]['samples_per_s']:.1f}/s" for n in order))
    per_round = {name: [r[name]["samples_per_s"] for r in rounds] for name in LOADERS}
    rate = {name: median(values) for name, values in per_round.items()}
    ratio = {name: rate[name] / rate["reference"] for name in LOADERS}
    # the loaders of one round ran minutes apart at most: their ratio is steadier than each rate
    round_ratio = {
        name: [a / b for a, b in zip(per_round[name], per_round["reference"], strict=True)] for name in LOADERS
    }
    rows = [
        [name, rate[name], rate[name] / args.workers, ratio[name], f"{spread(per_round[name]):.0%}"] for name in LOADERS
    ]
    headers = ["loader", "two-view samples/s", "per worker", "ratio vs reference", "spread"]
    print()
    print(format_table(headers, rows))
    print(
        f"ratio_vs_reference (dali / reference) = {ratio['dali']:.3f}  "
        f"ratio_torch_vs_reference = {ratio['torch']:.3f}  (spread = (max-min)/median over rounds)"
    )
    print(
        "per-round ratios vs reference: "
        + ", ".join(f"{name} " + " ".join(f"{v:.2f}" for v in round_ratio[name]) for name in LOADERS[:-1])
    )
    for name in LOADERS:
        print(f"  {name}: {DESCRIPTIONS[name]}")
    if not torch.cuda.is_available():
        print("CUDA: not available here; DALI mixed (GPU decode) rows pending.")
    payload = {
        "benchmark": "data_throughput",
        "size": args.size,
        "images": args.images,
        "image_sizes": {"landscape": LANDSCAPE, "portrait": PORTRAIT, "portrait_p": PORTRAIT_P},
        "jpeg_quality": JPEG_QUALITY,
        "mean_jpeg_bytes": jpeg_bytes / len(samples),
        "shard_size": SHARD_SIZE,
        "batch": args.batch,
        "workers": args.workers,
        "batches": args.batches,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "smoke": args.smoke,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "loaders": DESCRIPTIONS,
        "samples_per_s": rate,
        "samples_per_s_per_worker": {name: rate[name] / args.workers for name in LOADERS},
        "samples_per_s_rounds": per_round,
        "spread": {name: spread(values) for name, values in per_round.items()},
        "rounds_detail": rounds,
        "ratio_vs_reference": ratio["dali"],
        "ratio_torch_vs_reference": ratio["torch"],
        "ratio_vs_reference_rounds": round_ratio["dali"],
        "ratio_torch_vs_reference_rounds": round_ratio["torch"],
        "ratio_dali_folder_vs_reference": ratio["dali-folder"],
        "ratio_torch_folder_vs_reference": ratio["torch-folder"],
        "dali": dali_version,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        **env,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
