"""The torch loader's augmentation in two halves: a cheap part per image, the rest per batch.

Per image (:func:`crop_views`): each view's random-resized crop goes straight from the decoded image to
``size`` x ``size`` uint8 pixels (PIL's resize of a box: one pass, antialiased), flipped there when its draw
says so, and its random parameters are drawn (:func:`draw_params`) from torch's generator, which the stream
seeds per sample. (The DALI loader and the GPU path crop and draw the same way elsewhere.)

Per batch (:class:`BatchAugment`): colour jitter, grayscale, blur, solarize and normalisation as batched tensor
ops with those per-sample parameters. The jitter's four steps run in each sample's own random order, as in
torchvision's ``ColorJitter``, and all of them are affine maps of the colour: brightness and saturation
scale; contrast blends with the mean gray level, an affine function of the image's mean colour; the hue turns
the chroma plane of YIQ, as DALI's ``hsv`` does (torchvision turns it in HSV, which no matrix can: measured,
that alone cost more than the rest of the batch). So the jitter and the grayscale fold into one map ``A x + t``
per image (:func:`colour_map`), clamped to [0, 1] once, where torchvision clamps after each step.
``tests/test_view_statistics.py`` checks that the views are the distribution fb/moco's PIL transforms give.
The blur is a separable Gaussian per sample, the samples grouped by window size.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, ViewSpec, blur_window

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)
FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue", "order", "gray", "blur", "sigma", "solarize", "flip")
PARAMS = len(FIELDS)  # per view and sample: a float vector indexed by FIELDS
COLUMN = {name: i for i, name in enumerate(FIELDS)}
PERMUTATIONS = list(itertools.permutations(range(4)))  # the jitter's orders; "order" indexes them
SOLARIZE_TIE = 1e-4  # normalised units: a level exactly at the threshold still inverts, whatever the rounding


def draw_crop(width: int, height: int, aug: Augmentation) -> tuple[int, int, int, int]:
    """A random-resized crop box ``(left, top, right, bottom)``: area a uniform fraction of ``aug.crop_scale``,
    aspect ratio log-uniform in ``aug.crop_ratio``, 10 tries, then the whole image clipped to the ratio range
    (torchvision's ``RandomResizedCrop`` rule)."""
    area = width * height
    log_ratio = torch.log(torch.tensor(aug.crop_ratio)).tolist()  # in float32, as torchvision draws them
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*aug.crop_scale).item()
        ratio = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(aug.crop_ratio):
        w, h = width, round(width / min(aug.crop_ratio))
    elif in_ratio > max(aug.crop_ratio):
        w, h = round(height * max(aug.crop_ratio)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _factor(strength: float) -> float:
    return torch.empty(1).uniform_(max(0.0, 1 - strength), 1 + strength).item()


def draw_params(aug: Augmentation) -> torch.Tensor:
    """One view's random parameters (see ``FIELDS``), drawn from torch's generator."""
    p = torch.zeros(PARAMS)
    brightness, contrast, saturation, hue = aug.jitter
    if torch.rand(1).item() < aug.jitter_p:
        order = PERMUTATIONS.index(tuple(torch.randperm(4).tolist()))
        hue_shift = torch.empty(1).uniform_(-hue, hue).item()
        p[: COLUMN["order"] + 1] = torch.tensor(
            [1.0, _factor(brightness), _factor(contrast), _factor(saturation), hue_shift, order]
        )
    else:
        p[COLUMN["brightness"] : COLUMN["saturation"] + 1] = 1.0
    p[COLUMN["gray"]] = float(torch.rand(1).item() < aug.grayscale_p)
    if torch.rand(1).item() < aug.blur_p:
        p[COLUMN["blur"]], p[COLUMN["sigma"]] = 1.0, torch.empty(1).uniform_(*aug.blur_sigma).item()
    p[COLUMN["solarize"]] = float(torch.rand(1).item() < aug.solarize_p)
    p[COLUMN["flip"]] = float(torch.rand(1).item() < aug.flip_p)
    return p


def draw_views(width: int, height: int, views: tuple[ViewSpec, ...]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Each view's crop box and parameters for an image of ``width`` x ``height``, in the order both crop paths
    draw them (so that the same seed gives the same views on either)."""
    return [(draw_crop(width, height, spec.aug), draw_params(spec.aug)) for spec in views]


def crop_views(image: Image.Image, views: tuple[ViewSpec, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each view's ``(uint8 crop (3, size, size), parameters)`` of a decoded RGB image. The horizontal flip is
    done here, on the crop (it commutes with every later step: they act per pixel or, the blur, symmetrically)."""
    out = []
    for spec, (box, params) in zip(views, draw_views(*image.size, views), strict=True):
        crop = image.resize((spec.size, spec.size), Image.BILINEAR, box=box)
        if params[COLUMN["flip"]]:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append((torch.from_numpy(np.array(crop)).permute(2, 0, 1), params))
    return out


def jitter_orders(params: torch.Tensor) -> torch.Tensor:
    """(B, 4): each sample's order of the jitter's steps, 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    orders = [PERMUTATIONS[int(k)] for k in params[:, COLUMN["order"]].tolist()]
    return torch.tensor(orders, dtype=torch.long, device=params.device).view(-1, 4)


def hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) maps of RGB that turn the chroma plane of YIQ by ``turns`` and keep the luma (DALI's ``hsv``)."""
    angle = 2 * math.pi * turns
    rotation = torch.zeros(len(turns), 3, 3, device=turns.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
    rotation[:, 2, 1], rotation[:, 2, 2] = torch.sin(angle), torch.cos(angle)
    return YIQ_TO_RGB.to(turns.device) @ rotation @ RGB_TO_YIQ.to(turns.device)


def jitter_map(params: torch.Tensor, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each jittered sample's four steps in its order, composed as ``(A (B, 3, 3), t (B, 3))``, ``y = A x + t``
    (the identity for the others). ``mean_rgb``: each image's mean colour, which the contrast step's mean gray
    level follows."""
    batch, device = len(params), params.device
    eye = torch.eye(3, device=device).expand(batch, 3, 3)
    gray = torch.tensor(GRAY, device=device)
    gray_rows = gray.expand(3, 3)  # every channel <- the gray level
    brightness, contrast, saturation, hue = (params[:, COLUMN[name]] for name in FIELDS[1:5])
    orders, jittered = jitter_orders(params), params[:, COLUMN["jitter"]] > 0
    a, t = eye.clone(), torch.zeros(batch, 3, device=device)
    for place in range(4):
        for step in range(4):
            chosen = jittered & (orders[:, place] == step)
            if not chosen.any():
                continue
            if step == 0:
                a_new, t_new = brightness[:, None, None] * a, brightness[:, None] * t
            elif step == 1:  # blend with the mean gray level of the image as it is here: g . (A m + t)
                level = ((a @ mean_rgb[:, :, None])[:, :, 0] + t) @ gray
                a_new, t_new = contrast[:, None, None] * a, contrast[:, None] * t + ((1 - contrast) * level)[:, None]
            elif step == 2:
                blend = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * gray_rows
                a_new, t_new = _linear(blend, a, t)
            else:
                a_new, t_new = _linear(hue_rotation(hue), a, t)
            a, t = torch.where(chosen[:, None, None], a_new, a), torch.where(chosen[:, None], t_new, t)
    return a, t


def _linear(m: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return m @ a, (m @ t[:, :, None])[:, :, 0]


def colour_map(params: torch.Tensor, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's colour jitter in its own order, then its grayscale, as one ``(A (B, 3, 3), t (B, 3))`` on
    [0, 1] colours (:func:`jitter_map`; ``mean_rgb`` each image's mean colour there)."""
    a, t = jitter_map(params, mean_rgb)
    grayed = params[:, COLUMN["gray"]] > 0
    a_gray, t_gray = _linear(torch.tensor(GRAY, device=params.device).expand(len(params), 3, 3), a, t)
    return torch.where(grayed[:, None, None], a_gray, a), torch.where(grayed[:, None], t_gray, t)


def gaussian_kernels(sigmas: torch.Tensor) -> torch.Tensor:
    """(B, 2R + 1) normalised 1-D Gaussians, each over its own ``blur_window(sigma)`` taps and zero beyond,
    R the largest radius."""
    radii = [blur_window(s) // 2 for s in sigmas.tolist()]
    radius = max(radii)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigmas.device)
    kernels = torch.exp(-(x[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernels = kernels * (x[None].abs() <= torch.tensor(radii, device=sigmas.device)[:, None])
    return kernels / kernels.sum(1, keepdim=True)


def blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each (3, H, W) image by its own sigma, reflect padding (torchvision's)."""
    batch, channels, height, width = images.shape
    kernels = gaussian_kernels(sigmas).repeat_interleave(channels, 0)  # (B * 3, 2R + 1)
    radius = kernels.shape[1] // 2
    x = images.reshape(1, batch * channels, height, width)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=batch * channels)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def batch_output(shape: torch.Size, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An empty tensor for a batch, in shared memory when made in a DataLoader worker: the batch then reaches the
    main process without the copy into shared memory that the queue would make (as torch's default collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, device=device)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class BatchAugment:
    """One view's per-batch half: ``(uint8 crops (B, 3, S, S), parameters (B, PARAMS))`` -> normalised views (the
    crops come flipped already, see :func:`crop_views`), on the crops' device: a loader worker's CPU, the DALI
    loader's thread, or the GPU (:mod:`moco_scale.data.device_views`).

    The steps work on normalised values, so that the batch is read and written few times: the scaling to
    [0, 1], the colour map (:func:`colour_map`) and the normalisation are one affine map per image, written
    straight into the output; the clamp to [0, 1] is a clamp to each channel's normalised bounds; the blur
    commutes with the per-channel normalisation (its kernel sums to 1), and the solarize threshold and inversion
    are carried over to normalised units.
    """

    def __init__(self, spec: ViewSpec, dtype: torch.dtype = torch.float32):
        self.aug, self.dtype = spec.aug, dtype
        self.mean = torch.tensor(IMAGENET_MEAN)
        self.std = torch.tensor(IMAGENET_STD)

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        device, batch = crops.device, len(crops)
        params = params.to(device)
        mean, std = self.mean.to(device), self.std.to(device)
        x = crops.to(torch.float32, memory_format=torch.contiguous_format)  # DALI's crops come NHWC: one pass
        if ((params[:, COLUMN["jitter"]] > 0) | (params[:, COLUMN["gray"]] > 0)).any():
            a, t = colour_map(params, x.mean(dim=(2, 3)) / 255)  # the whole batch: an identity costs less than a gather
        else:
            a, t = torch.eye(3, device=device).expand(batch, 3, 3), torch.zeros(batch, 3, device=device)
        a, t = a / (255 * std[:, None]), (t - mean) / std  # from 0-255 levels straight to normalised values
        out = batch_output(x.shape, self.dtype, device)
        z = out if self.dtype == torch.float32 else torch.empty(x.shape, device=device)
        torch.baddbmm(t[:, :, None], a, x.reshape(batch, 3, -1), out=z.view(batch, 3, -1))
        for channel, (low, high) in enumerate(zip((-mean / std).tolist(), ((1 - mean) / std).tolist(), strict=True)):
            z[:, channel].clamp_(low, high)  # scalar bounds: 3x faster than one clamp to broadcast tensors
        sigmas, blurred = params[:, COLUMN["sigma"]], params[:, COLUMN["blur"]] > 0
        windows = torch.tensor([blur_window(sigma) for sigma in sigmas.tolist()], device=device)
        for window in windows[blurred].unique().tolist():  # taps cost time: each window on its own
            chosen = blurred & (windows == window)
            z[chosen] = blur(z[chosen], sigmas[chosen])
        solarized = (params[:, COLUMN["solarize"]] > 0).view(batch, 1, 1, 1)
        if solarized.any():  # v >= threshold -> 1 - v, in normalised units (a level is ~0.017: the margin is a tie's)
            threshold = ((self.aug.solarize_threshold / 255 - mean) / std - SOLARIZE_TIE).view(1, 3, 1, 1)
            inverted = ((1 - 2 * mean) / std).view(1, 3, 1, 1) - z
            z.copy_(torch.where(solarized & (z >= threshold), inverted, z))
        return out if z is out else out.copy_(z)
