"""ResNet encoders by name, with a width multiplier and a small-image stem.

The module tree mirrors ``torchvision.models.ResNet`` (conv1, bn1, layer1..4, fc), so a
width-1, standard-stem backbone's ``state_dict`` loads into torchvision with ``strict=True``.
Its residual blocks are torchvision's, made :class:`Checkpointable`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet as torchvision_resnet

from moco_scale.models.blocks import Checkpointable
from moco_scale.models.init import initialise_from_torch_seed


class BasicBlock(Checkpointable, torchvision_resnet.BasicBlock):
    """torchvision's two-conv residual block (ResNet-18/34), activation checkpointing optional."""


class Bottleneck(Checkpointable, torchvision_resnet.Bottleneck):
    """torchvision's bottleneck residual block (ResNet-50 and wider), activation checkpointing optional."""


# name -> (block, blocks per stage, groups, width per group)
RESNET_SPECS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int], int, int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
}


class ResNet(nn.Module):
    """A torchvision-compatible ResNet whose every stage is ``width`` times wider.

    ``fc`` is an identity: the backbone returns pooled features of size ``feature_dim``.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, int, int, int],
        groups: int = 1,
        width_per_group: int = 64,
        width: int = 1,
        small_stem: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        stem = 64 * width
        if small_stem:
            self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = stem
        self._block_kwargs = {"groups": groups, "base_width": width_per_group, "norm_layer": norm_layer}
        self.layer1 = self._make_stage(block, 64 * width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 128 * width, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 256 * width, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 512 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.feature_dim = self._inplanes
        initialise_from_torch_seed(self, [self.init_rule])

    def _make_stage(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self._inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                self._block_kwargs["norm_layer"](planes * expansion),
            )
        stage = [block(self._inplanes, planes, stride, downsample, **self._block_kwargs)]
        self._inplanes = planes * expansion
        stage += [block(self._inplanes, planes, **self._block_kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    @staticmethod
    def init_rule(module: nn.Module, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> bool:
        """torchvision's ResNet initialisation: convolutions He-normal over their outputs (BN as PyTorch's)."""
        if not isinstance(module, nn.Conv2d):
            return False
        nn.init.kaiming_normal_(tensors["weight"], mode="fan_out", nonlinearity="relu", generator=generator)
        return True

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, in order: the units of the FSDP cut plan and of activation checkpointing."""
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_resnet(
    arch: str,
    width: int = 1,
    small_stem: bool = False,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> ResNet:
    """Build a backbone by torchvision name; unknown names raise ``ValueError`` listing the choices."""
    if arch not in RESNET_SPECS:
        raise ValueError(f"unknown arch {arch!r}; choices: {', '.join(RESNET_SPECS)}")
    block, layers, groups, width_per_group = RESNET_SPECS[arch]
    return ResNet(block, layers, groups, width_per_group, width, small_stem, norm_layer)
