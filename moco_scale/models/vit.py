"""Vision Transformers as MoCo v3 trains them ("An Empirical Study of Training Self-Supervised Vision
Transformers", Chen, Xie and He, 2021), by name: vit_tiny (ours, for tests and the CPU demo), vit_small,
vit_base, vit_large and vit_huge.

As in moco-v3's ``vits.py``:

- a fixed 2-D sin-cos position embedding (a quarter of the channels each for the sine and cosine of the
  patch's column and of its row; the class token's position is zeros);
- a class token, drawn from N(0, 1e-6); the backbone's feature is the class token after the final norm;
- pre-norm blocks (LayerNorm eps 1e-6), multi-head self-attention, an MLP of ratio 4 with GELU;
- ViT-S with 12 heads (moco-v3's choice; DeiT-S has 6);
- the initialisation: every linear layer Xavier-uniform with zero bias, the fused q/k/v projection with the
  bound of one D x D matrix (q, k and v drawn as three separate matrices), the patch projection
  Xavier-uniform over its flattened 3 x p x p inputs with zero bias;
- the random patch projection frozen (``freeze_patch_embed``), the paper's fix for the training
  instability it traced to the first layer.

Where we differ: the module tree mirrors ``torchvision.models.VisionTransformer`` (``conv_proj``,
``class_token``, ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_<i>`` with ``ln_1``,
``self_attention`` with ``nn.MultiheadAttention``'s names, ``ln_2``, ``mlp.0`` and ``mlp.3``, ``encoder.ln``), so the
backbone loads into torchvision with ``strict=True``; the position embedding is a buffer (torchvision's is a
parameter, moco-v3's a frozen parameter); vit_huge is ViT-H/14's size (moco-v3 ships no ViT-H).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from moco_scale.models.blocks import Checkpointable
from moco_scale.models.init import initialise_from_torch_seed

# name -> (width, blocks, heads)
VIT_SPECS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 6, 3),
    "vit_small": (384, 12, 12),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
MLP_RATIO = 4


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """(1, 1 + grid * grid, width): zeros for the class token, then for the patch in row r and column c (row
    major) the sines and cosines of c and of r at ``width / 4`` frequencies from 1 down to 1 / 10000."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    col_angles = cols.flatten()[:, None] * frequencies[None]
    row_angles = rows.flatten()[:, None] * frequencies[None]
    patches = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()[None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters and names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), computed from its one input with ``scaled_dot_product_attention``. The fused
    q/k/v projection is used whole: ``nn.MultiheadAttention(y, y, y)`` splits it three ways, and under ZeRO-3
    autograd's saved splits kept each block's gathered weight alive until the backward (162 MiB per rank at
    ViT-B, measured)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class PreNormBlock(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attention = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        hidden = MLP_RATIO * width
        # Identity where torchvision's MLP has dropouts, so the linear layers keep its names (mlp.0, mlp.3).
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y)
        return x + self.mlp(self.ln_2(x))


class EncoderBlock(Checkpointable, PreNormBlock):
    """A transformer block, activation checkpointing optional."""


class Encoder(nn.Module):
    """Adds the position embedding, runs the blocks, normalises."""

    def __init__(self, grid: int, width: int, blocks: int, heads: int):
        super().__init__()
        self.register_buffer("pos_embedding", sincos_position_embedding(grid, width))
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(width, heads)) for i in range(blocks))
        )
        self.ln = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    """Patches of ``patch_size`` of an ``image_size`` square image -> the class token's feature
    (``feature_dim`` wide)."""

    def __init__(
        self, image_size: int, patch_size: int, width: int, blocks: int, heads: int, freeze_patch_embed: bool = True
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.conv_proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder(image_size // patch_size, width, blocks, heads)
        self.feature_dim = width
        self.conv_proj.requires_grad_(not freeze_patch_embed)
        initialise_from_torch_seed(self, [self.init_rule])

    @staticmethod
    def init_rule(module: nn.Module, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> bool:
        """moco-v3's initialisation, from each tensor's shape: linear layers Xavier-uniform with zero bias; the
        fused q/k/v projection with one width x width matrix's bound; the patch projection Xavier-uniform over
        its 3 x p x p inputs with zero bias; the class token N(0, 1e-6); the sin-cos position embedding."""
        if isinstance(module, nn.Conv2d):  # the patch projection, a ViT's only convolution
            width, inputs = tensors["weight"].shape[0], tensors["weight"][0].numel()
            bound = math.sqrt(6.0 / (inputs + width))
            nn.init.uniform_(tensors["weight"], -bound, bound, generator=generator)
            tensors["bias"].zero_()
        elif isinstance(module, SelfAttention):
            width = tensors["in_proj_weight"].shape[1]
            bound = math.sqrt(6.0 / (width + width))  # q, k and v as three width x width matrices
            nn.init.uniform_(tensors["in_proj_weight"], -bound, bound, generator=generator)
            tensors["in_proj_bias"].zero_()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(tensors["weight"], generator=generator)
            tensors["bias"].zero_()
        elif isinstance(module, VisionTransformer):
            nn.init.normal_(tensors["class_token"], std=1e-6, generator=generator)
        elif isinstance(module, Encoder):
            positions, width = tensors["pos_embedding"].shape[1:]
            tensors["pos_embedding"].copy_(sincos_position_embedding(math.isqrt(positions - 1), width))
        else:
            return False
        return True

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order: the units of the FSDP cut plan and of activation checkpointing."""
        return list(self.encoder.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1).to(patches.dtype), patches], dim=1)
        return self.encoder(tokens)[:, 0]


def build_vit(arch: str, image_size: int, patch_size: int = 16, freeze_patch_embed: bool = True) -> VisionTransformer:
    """Build a ViT by name; unknown names raise ``ValueError`` listing the choices."""
    if arch not in VIT_SPECS:
        raise ValueError(f"unknown arch {arch!r}; choices: {', '.join(VIT_SPECS)}")
    width, blocks, heads = VIT_SPECS[arch]
    return VisionTransformer(image_size, patch_size, width, blocks, heads, freeze_patch_embed)
