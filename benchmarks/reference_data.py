"""fb/moco's data path, written here after its description: an ImageFolder tree read with PIL, each image
transformed twice by torchvision's PIL transforms (``TwoCropsTransform``), a DistributedSampler per rank.

The transforms are built from moco_scale's :class:`~moco_scale.data.augment.Augmentation`, so this reference
and our loaders take one recipe; only the code that applies it differs. PIL's Gaussian blur takes sigma as its
radius, as fb/moco's ``GaussianBlur`` passes it; solarization is PIL's ``ImageOps.solarize``, as in moco-v3.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets
from torchvision import transforms as T

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec
from moco_scale.data.shards import IMAGE_EXTENSIONS


class PILGaussianBlur:
    """SimCLR's blur as fb/moco applies it: a PIL Gaussian blur of radius sigma ~ U(low, high)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """Invert the levels at or above ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, self.threshold)


def pil_view_transform(spec: ViewSpec) -> T.Compose:
    """One view of a PIL image, as a normalised float tensor (fb/moco's order of transforms)."""
    aug = spec.aug
    return T.Compose(
        [
            T.RandomResizedCrop(spec.size, scale=aug.crop_scale, ratio=aug.crop_ratio),
            T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_p),
            T.RandomGrayscale(p=aug.grayscale_p),
            T.RandomApply([PILGaussianBlur(aug.blur_sigma)], p=aug.blur_p),
            T.RandomApply([PILSolarize(aug.solarize_threshold)], p=aug.solarize_p),
            T.RandomHorizontalFlip(p=aug.flip_p),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


class TwoCropsTransform:
    """The query and key views of one image: one draw of each view's transform."""

    def __init__(self, first: Callable[[Image.Image], torch.Tensor], second: Callable[[Image.Image], torch.Tensor]):
        self.first, self.second = first, second

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.first(image), self.second(image)]


def two_crops(views: tuple[ViewSpec, ViewSpec]) -> TwoCropsTransform:
    return TwoCropsTransform(pil_view_transform(views[0]), pil_view_transform(views[1]))


def unpack_to_image_folder(shards: list[str], root: Path) -> Path:
    """Write the images of webdataset shards as ``root/<class>/<key>.<ext>``, the tree ImageFolder reads."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in members.items():
                key, _, ext = name.rpartition(".")
                if ext not in IMAGE_EXTENSIONS or f"{key}.cls" not in members:
                    continue
                label = tar.extractfile(members[f"{key}.cls"]).read().decode().strip()
                folder = root / f"class_{int(label):04d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{Path(key).name}.{ext}").write_bytes(tar.extractfile(member).read())
    return root


def image_folder_batches(
    root: Path, views: tuple[ViewSpec, ViewSpec], batch_size: int, rank: int, world_size: int, workers: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(view1, view2, labels)`` batches of this rank, epoch after epoch, as fb/moco's ``main_moco.py`` loads them."""
    dataset = datasets.ImageFolder(str(root), two_crops(views))
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for (view1, view2), labels in loader:
            yield view1, view2, labels
        epoch += 1
