"""The torch loader's batched augmentation against torchvision's per-image ops, for fixed random parameters; the
hue against a YIQ rotation written here (DALI's semantics, see moco_scale.data.batch_augment)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, ViewSpec, blur_window
from moco_scale.data.batch_augment import (
    FIELDS,
    PARAMS,
    PERMUTATIONS,
    BatchAugment,
    blur,
    colour_map,
    crop_views,
    draw_crop,
)

STEPS = {
    0: lambda x, p: TF.adjust_brightness(x, p[1]),
    1: lambda x, p: TF.adjust_contrast(x, p[2]),
    2: lambda x, p: TF.adjust_saturation(x, p[3]),
    3: lambda x, p: _turn_yiq(x, p[4]),
}


def _turn_yiq(x: torch.Tensor, turns: float) -> torch.Tensor:
    """Each pixel to YIQ (the NTSC matrix), its (I, Q) turned by ``turns`` of a full turn, and back."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    y, i, q = torch.einsum("ij,jhw->ihw", to_yiq, x)
    angle = torch.tensor(2 * torch.pi * turns)
    i, q = i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()
    return torch.einsum("ij,jhw->ihw", torch.linalg.inv(to_yiq), torch.stack([y, i, q]))


def _images(n: int, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, 12, 12, generator=g)


def _params(n: int, seed: int = 0, **fixed: float) -> torch.Tensor:
    """Random jitter parameters in range for a mid-grey image (no clamping) and a random order per sample."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(n, PARAMS)
    p[:, 0] = 1.0
    p[:, 1:4] = 0.8 + 0.4 * torch.rand(n, 3, generator=g)
    p[:, 4] = 0.2 * torch.rand(n, generator=g) - 0.1
    p[:, 5] = torch.randint(0, len(PERMUTATIONS), (n,), generator=g)
    for name, value in fixed.items():
        p[:, FIELDS.index(name)] = value
    return p


def _reference_jitter(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """torchvision's ColorJitter with these factors and order, then the grayscale, on one float image."""
    if p[0]:
        for step in PERMUTATIONS[int(p[5])]:
            x = STEPS[step](x, p)
    return TF.rgb_to_grayscale(x, num_output_channels=3) if p[6] else x


@pytest.mark.parametrize("gray", [0.0, 1.0])
def test_jitter_in_each_samples_order_and_the_grayscale_are_torchvisions(gray: float) -> None:
    """Mid-range images and factors near 1, so that torchvision's clamping after each step never bites."""
    x, params = _images(48, low=0.3, high=0.6), _params(48, gray=gray)
    expected = torch.stack([_reference_jitter(image, p.tolist()) for image, p in zip(x, params, strict=True)])
    a, t = colour_map(params, x.mean(dim=(2, 3)))
    mapped = torch.einsum("bij,bjhw->bihw", a, x) + t[:, :, None, None]
    torch.testing.assert_close(mapped.clamp(0, 1), expected, atol=1e-5, rtol=0)


def test_blur_is_torchvisions_per_sample_sigma() -> None:
    x, sigmas = _images(6), torch.tensor([0.1, 0.5, 0.9, 1.3, 1.7, 2.0])
    expected = torch.stack(
        [
            TF.gaussian_blur(image, [blur_window(s.item())] * 2, [s.item()] * 2)
            for image, s in zip(x, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(blur(x, sigmas), expected, atol=1e-5, rtol=0)


def test_solarize_and_normalise_are_torchvisions() -> None:
    spec = ViewSpec(12, Augmentation(solarize_threshold=100.0))
    crops = (255 * _images(8)).round().to(torch.uint8)
    params = torch.zeros(8, PARAMS)
    params[::2, FIELDS.index("solarize")] = 1.0
    normalise = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    solarized = params[:, FIELDS.index("solarize")].bool().tolist()
    expected = [normalise(TF.solarize(c, 100) if on else c) for c, on in zip(crops, solarized, strict=True)]
    torch.testing.assert_close(BatchAugment(spec)(crops, params), torch.stack(expected), atol=1e-5, rtol=0)


def test_crops_are_flipped_where_drawn() -> None:
    image = Image.fromarray((255 * _images(1)[0].permute(1, 2, 0)).round().to(torch.uint8).numpy()).resize((40, 30))
    spec = ViewSpec(12, Augmentation(flip_p=0.5))
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        ((crop, params),) = crop_views(image, (spec,))
        torch.manual_seed(seed)
        box = draw_crop(40, 30, spec.aug)
        unflipped = TF.pil_to_tensor(image.resize((12, 12), Image.BILINEAR, box=box))
        flipped = bool(params[FIELDS.index("flip")])
        flips.add(flipped)
        assert torch.equal(crop, TF.horizontal_flip(unflipped) if flipped else unflipped)
    assert flips == {True, False}


def test_crop_boxes_are_torchvisions_draws() -> None:
    """The same generator state gives torchvision's RandomResizedCrop box, fallback included."""
    image = Image.new("RGB", (400, 300))
    for aug in (Augmentation(), Augmentation(crop_scale=(0.9, 1.0), crop_ratio=(3.0, 4.0))):
        for seed in range(200):
            torch.manual_seed(seed)
            ours = draw_crop(400, 300, aug)
            torch.manual_seed(seed)
            top, left, h, w = T.RandomResizedCrop.get_params(image, list(aug.crop_scale), list(aug.crop_ratio))
            assert ours == (left, top, left + w, top + h), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_whole_view_is_torchvisions_steps_then_the_normalisation(dtype: torch.dtype) -> None:
    """Every step at once, on normalised values inside (see BatchAugment): jitter in each sample's order, grayscale,
    blur and solarize, as torchvision applies them one image at a time in [0, 1], then Normalize."""
    spec = ViewSpec(12, Augmentation(solarize_threshold=128.0))
    crops = (255 * _images(16, seed=5, low=0.3, high=0.6)).round().to(torch.uint8)
    params = _params(16, seed=3)
    column = {name: FIELDS.index(name) for name in ("jitter", "gray", "blur", "sigma", "solarize")}
    params[::2, column["gray"]] = 1.0
    params[::3, column["blur"]] = 1.0
    params[:, column["sigma"]] = torch.linspace(0.1, 2.0, 16)
    plain = torch.arange(16) % 4 == 1  # no jitter, gray or blur: their levels sit exactly on the threshold's grid
    params[plain, column["jitter"]] = params[plain, column["gray"]] = params[plain, column["blur"]] = 0.0
    params[plain, column["solarize"]] = 1.0
    expected = []
    for crop, p in zip(crops, params.tolist(), strict=True):
        x = _reference_jitter(crop.float() / 255, p)
        if p[column["blur"]]:
            x = TF.gaussian_blur(x, [blur_window(p[column["sigma"]])] * 2, [p[column["sigma"]]] * 2)
        if p[column["solarize"]]:
            x = torch.where(x >= 128 / 255, 1 - x, x)
        expected.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    views = BatchAugment(spec, dtype)(crops, params)
    assert views.dtype == dtype and (crops[plain] >= 128).any()  # some levels on or above the threshold
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(views.float(), torch.stack(expected), atol=tolerance, rtol=0)
