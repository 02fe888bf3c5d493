"""The built-in demo dataset: scikit-learn's 1,797 handwritten digits as 32 px JPEG shards.

The images ship inside scikit-learn, so the demo needs no network. They are written once into
a cache folder (``$MOCO_SCALE_CACHE``, default ``~/.cache/moco_scale``): 1,497 training images
and 300 held-out images for the kNN monitor.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from moco_scale.data.decode_check import decoders
from moco_scale.data.shards import write_shards

DEMO_VERSION = "digits-v4"  # v4: every image checked with PIL and DALI (checked_with in the manifest)
IMAGE_SIZE = 32
HELD_OUT = 300


def cache_root() -> Path:
    return Path(os.environ.get("MOCO_SCALE_CACHE", Path.home() / ".cache" / "moco_scale"))


def _jpeg(pixels: np.ndarray) -> bytes:
    gray = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    image = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _samples(images: np.ndarray, labels: np.ndarray, offset: int) -> Iterator[tuple[str, bytes, int]]:
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        yield f"digit{offset + i:05d}", _jpeg(pixels), int(label)


def ensure_demo_shards(root: Path | None = None) -> dict[str, Path]:
    """Write the demo shards unless they exist; returns the ``train`` and ``val`` folders.

    Safe to call from several ranks at once: each writer builds in a private folder and the
    first complete one is renamed into place.
    """
    from sklearn.datasets import load_digits

    root = (root or cache_root()) / f"{DEMO_VERSION}-{'-'.join(decoders())}"  # re-made once DALI is installed
    if (root / "train" / "manifest.json").is_file() and (root / "val" / "manifest.json").is_file():
        return {"train": root / "train", "val": root / "val"}
    digits = load_digits()
    images, labels = digits.images, digits.target
    train_n = len(images) - HELD_OUT
    staging = root.parent / f".{root.name}.{os.getpid()}.tmp"
    names = [str(c) for c in range(10)]
    write_shards(_samples(images[:train_n], labels[:train_n], 0), staging / "train", 200, "train", names, check=True)
    write_shards(_samples(images[train_n:], labels[train_n:], train_n), staging / "val", 200, "val", names, check=True)
    try:
        os.replace(staging, root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return {"train": root / "train", "val": root / "val"}
