"""MoCo v1/v2/v3 augmentations as plain specs: the one source both loader backends build from."""

from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """The random transformations of one view, with their probabilities."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_p: float = 0.5


def blur_window(sigma: float) -> int:
    """Taps of a Gaussian blur of ``sigma``: +-3 sigma, like PIL's radius blur in fb/moco (and DALI's default)."""
    return 2 * math.ceil(3 * sigma) + 1


def moco_views(version: str, size: int) -> tuple[ViewSpec, ViewSpec]:
    """The two views' specs for a MoCo version, with the papers' parameters."""
    if version == "v1":
        v1 = ViewSpec(size, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0)
        return v1, v1
    if version == "v2":
        v2 = ViewSpec(size)
        return v2, v2
    if version == "v3":
        return (
            ViewSpec(size, crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0),
            ViewSpec(size, crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2),
        )
    raise ValueError(f"unknown MoCo version {version!r}; choices: v1, v2, v3")
