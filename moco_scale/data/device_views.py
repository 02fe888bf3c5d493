"""The torch loader on a GPU without DALI: JPEGs decoded on the device in batches, cropped there, and the batched
augmentation run there, the same code (:class:`~moco_scale.data.batch_augment.BatchAugment`) as in the CPU
workers.

The workers (:class:`~moco_scale.data.torch_loader.TwoViewStream` with ``encoded=True``) read each sample, walk a
JPEG's marker structure (:func:`~moco_scale.data.decode_check.jpeg_structure_error`), read its size from the
header, draw both views' crop boxes and parameters in the CPU path's order
(:func:`~moco_scale.data.batch_augment.draw_views`, so a seed gives the same draws on either path), and send the
encoded bytes. Any other image (PNG, a CMYK JPEG, a broken one) is decoded and cropped in the worker, as on the
CPU path, and sent as crops (or counted as bad there).

In the main process, :class:`DeviceViews` decodes the batch's JPEGs with ``torchvision.io.decode_jpeg`` on the
device in one call, crops and resizes each view there (antialiased bilinear, as PIL's resize of a box on the
CPU path: equal up to rounding, not bitwise), flips it, and augments the batch on the device. A JPEG that the
batch decode refuses is decoded alone, then with PIL on the CPU; one that fails all three is left out of its
batch and counted in ``dropped``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from moco_scale.data.augment import ViewSpec
from moco_scale.data.batch_augment import COLUMN, BatchAugment

Encoded = tuple[bytes, tuple[int, int]]  # a JPEG's bytes and its (width, height)


def jpeg_to_decode(payload: bytes) -> Encoded | None:
    """``(payload, (width, height))`` when ``payload`` is a whole RGB or gray JPEG that the device can decode,
    else None (decode it on the CPU)."""
    from moco_scale.data.decode_check import jpeg_structure_error

    if not payload.startswith(b"\xff\xd8") or jpeg_structure_error(payload) is not None:
        return None
    try:
        with Image.open(io.BytesIO(payload)) as header:  # reads the header only
            if header.format == "JPEG" and header.mode in ("RGB", "L"):
                return payload, header.size
    except Exception:  # a header PIL cannot parse: the CPU decode decides
        return None
    return None


def _decode_each(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One payload at a time: on the device, else with PIL on the CPU; None where both fail."""
    images: list[torch.Tensor | None] = []
    for payload in payloads:
        try:
            images.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                with Image.open(io.BytesIO(payload.numpy().tobytes())) as image:
                    rgb = np.array(image.convert("RGB"))
                images.append(torch.from_numpy(rgb).permute(2, 0, 1).to(device))
            except Exception:  # a file that no decoder takes: left out of the batch
                images.append(None)
    return images


def decode_on(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 RGB images on ``device`` of JPEG byte tensors, decoded in one call where the batch allows."""
    if not payloads:
        return []
    try:
        return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return _decode_each(payloads, device)


def crop_on(image: torch.Tensor, box: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """One view of a decoded (3, H, W) uint8 image: its crop ``box`` (left, top, right, bottom) resized to
    ``size`` (antialiased bilinear), flipped when ``params`` say so."""
    left, top, right, bottom = box.tolist()
    crop = TF.resized_crop(image, top, left, bottom - top, right - left, [size, size], antialias=True)
    return crop.flip(-1) if params[COLUMN["flip"]] else crop


class DeviceViews:
    """Finishes a batch of encoded samples (see the module docstring) into ``(view1, view2, labels)`` on
    ``device``; ``dropped`` counts the samples left out because no decoder took them."""

    def __init__(self, views: tuple[ViewSpec, ViewSpec], device: torch.device, dtype: torch.dtype = torch.float32):
        self.views, self.device = views, device
        self.augment = (BatchAugment(views[0], dtype), BatchAugment(views[1], dtype))
        self.dropped = 0

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        payloads, boxes, crops1, params1, crops2, params2, labels = batch
        encoded = [i for i, payload in enumerate(payloads) if payload.numel()]
        images = dict(zip(encoded, decode_on([payloads[i] for i in encoded], self.device), strict=True))
        kept = [i for i in range(len(payloads)) if images.get(i, 0) is not None]
        self.dropped += len(payloads) - len(kept)
        out = []
        pairs = zip(self.views, (crops1, crops2), (params1, params2), strict=True)
        for view, (spec, crops, params) in enumerate(pairs):
            views = [
                crop_on(images[i], boxes[i][view], params[i], spec.size)
                if i in images
                else crops[i].to(self.device, non_blocking=True)
                for i in kept
            ]
            out.append(self.augment[view](torch.stack(views), params[kept]))
        return out[0], out[1], labels[kept]
