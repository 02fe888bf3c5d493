"""Backbones by family: ResNets (``resnet.py``) and Vision Transformers (``vit.py``). Each returns pooled
features of ``feature_dim``, lists its repeated ``blocks()`` (the FSDP cut plan and the units of activation
checkpointing) and has an ``init_rule`` (its initialisation by name, ``init.py``); :func:`build_backbone`
builds one from the ``model`` config section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moco_scale.models.resnet import RESNET_SPECS, ResNet, build_resnet
from moco_scale.models.vit import VIT_SPECS, VisionTransformer, build_vit

if TYPE_CHECKING:
    from moco_scale.config import ModelConfig

ARCHS = (*RESNET_SPECS, *VIT_SPECS)


def build_backbone(model: ModelConfig, image_size: int) -> ResNet | VisionTransformer:
    """The backbone ``model`` names, for ``image_size`` px inputs (a ViT's position embedding depends on it)."""
    if model.arch in VIT_SPECS:
        backbone: nn.Module = build_vit(model.arch, image_size, model.patch_size, model.freeze_patch_embed)
    else:
        backbone = build_resnet(model.arch, model.width, model.small_stem)
    for block in backbone.blocks():
        block.activation_checkpointing = model.activation_checkpointing
    return backbone


__all__ = ["ARCHS", "RESNET_SPECS", "VIT_SPECS", "ResNet", "VisionTransformer", "build_backbone", "build_resnet"]
