"""MoCo v1/v2/v3 augmentations as plain specs: the one source both loader backends build from.

An :class:`Augmentation` is the random transformations of one view with their probabilities, in
torchvision's order and units; a :class:`ViewSpec` is one view: its output size and its augmentation.
``PRESETS`` holds the papers' two views for each MoCo version; the config (``aug.*``) starts from the
one ``data.augmentation`` names and replaces the fields a user sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augmentation:
    """One view's random transformations, applied in this order: crop, jitter, grayscale, blur, solarize, flip."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized crop: fraction of the image's area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and its aspect ratio (width / height)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian sigma in pixels, drawn uniformly
    solarize_p: float = 0.0
    solarize_threshold: float = 128.0  # pixel levels (0-255) at or above it are inverted
    flip_p: float = 0.5  # horizontal

    def problems(self) -> list[str]:
        """What is out of range, as ``field: message`` texts (empty when every value is valid)."""
        found = []
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            found.append(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            found.append(f"crop_ratio must satisfy 0 < low <= high, got {list(self.crop_ratio)}")
        brightness, contrast, saturation, hue = self.jitter
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            found.append(
                f"jitter needs brightness, contrast, saturation >= 0 and hue in [0, 0.5], got {list(self.jitter)}"
            )
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{name} is a probability, in [0, 1], got {getattr(self, name)}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            found.append(f"blur_sigma must satisfy 0 < low <= high, got {list(self.blur_sigma)}")
        if not 0 <= self.solarize_threshold <= 256:
            found.append(f"solarize_threshold is a pixel level in [0, 256], got {self.solarize_threshold}")
        return found


@dataclass(frozen=True)
class ViewSpec:
    """One view: a ``size`` x ``size`` crop and its random transformations."""

    size: int
    aug: Augmentation = field(default_factory=Augmentation)


_V1 = Augmentation(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0)  # MoCo v1: crop, jitter, gray, flip
_V2 = Augmentation()  # MoCo v2 adds the blur
_V3 = Augmentation(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))  # MoCo v3: BYOL's asymmetric pair
PRESETS: dict[str, tuple[Augmentation, Augmentation]] = {
    "v1": (_V1, _V1),
    "v2": (_V2, _V2),
    "v3": (replace(_V3, blur_p=1.0), replace(_V3, blur_p=0.1, solarize_p=0.2)),
}
LINEAR_EVAL = Augmentation(crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)  # crop and flip only


def blur_window(sigma: float) -> int:
    """Taps of a Gaussian blur of ``sigma``: +-3 sigma, like PIL's radius blur in fb/moco (and DALI's default)."""
    return 2 * math.ceil(3 * sigma) + 1


def moco_views(version: str, size: int) -> tuple[ViewSpec, ViewSpec]:
    """The two views' specs for a MoCo version, with the papers' parameters."""
    if version not in PRESETS:
        raise ValueError(f"unknown MoCo version {version!r}; choices: {', '.join(PRESETS)}")
    first, second = PRESETS[version]
    return ViewSpec(size, first), ViewSpec(size, second)
