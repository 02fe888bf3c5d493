"""A plain MoCo v3 for Vision Transformers, written the way moco-v3's ``vits.py``, ``moco/builder.py`` and
``main_moco.py`` do it: the reference beside which ``benchmarks/quality.py`` measures ours on ViTs.

- timm's ``VisionTransformer`` (qkv bias, LayerNorm eps 1e-6, MLP ratio 4, the class token after the final
  norm as the feature) with a fixed 2-D sin-cos position embedding held as a frozen parameter;
- moco-v3's initialisation over timm's: every ``nn.Linear`` of the backbone Xavier-uniform with zero bias, the
  fused qkv with the bound of one of its three matrices, the class token N(0, 1e-6), the patch projection
  uniform with the Xavier bound of its 3 x p x p inputs and zero bias, frozen (``stop_grad_conv1``);
- the heads: a 3-layer projector on both encoders and a 2-layer predictor on the query side, Linear (no
  bias)-BN-ReLU with an affine-free BN last, PyTorch's default Linear init; the BN statistics of the global
  batch (moco-v3 converts to ``nn.SyncBatchNorm``, which runs on GPUs only: here the batch is all-gathered,
  differentiably, and normalised whole);
- the momentum encoder a copy of the base encoder, updated parameter by parameter in a Python loop inside
  the forward, its momentum on a half cosine from m0 to 1 over the run;
- each view's query against the other view's keys, all-gathered from every rank: logits q k^T / T, labels
  the query's own index in the global batch, cross-entropy x 2T, the two directions summed;
- DDP around the whole module; AdamW with weight decay on every parameter (moco-v3 decays them all), the
  learning rate warmed up linearly, then a half cosine, set every step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from reference_moco import gather_all  # fb/moco's concat_all_gather, which moco-v3 keeps
from torch import nn

# name -> (width, blocks, heads), as moco_scale.models.vit names them
WIDTHS = {"vit_tiny": (192, 6, 3), "vit_small": (384, 12, 12), "vit_base": (768, 12, 12)}


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(1, 1 + grid^2, width): a zero row for the class token, then sin/cos of each patch's x and y."""
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    ax, ay = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    table = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), table])[None]


def vit_backbone(arch: str, image_size: int, patch_size: int) -> nn.Module:
    """timm's ViT with moco-v3's position embedding and initialisation; ``head`` is the identity."""
    from timm.models.vision_transformer import VisionTransformer

    width, depth, heads = WIDTHS[arch]
    vit = VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
    )
    vit.pos_embed = nn.Parameter(sincos_2d(image_size // patch_size, width), requires_grad=False)
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:  # three D x D matrices side by side: the bound of one of them
                bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    proj.weight.requires_grad = proj.bias.requires_grad = False
    return vit


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over every rank's rows: the batch all-gathered (with its gradient), normalised whole, and this
    rank's rows kept; the running statistics are the global batch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        everyone = torch.cat(dist_nn.all_gather(x))
        y = F.batch_norm(
            everyone, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps
        )
        return y[dist.get_rank() * x.shape[0] :][: x.shape[0]]


def bn_mlp(layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        blocks.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if last:
            blocks.append(GlobalBatchNorm1d(out_dim, affine=False))
        else:
            blocks += [GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks)


class ReferenceMoCoV3(nn.Module):
    """Base and momentum encoders with projectors, the predictor, and the symmetric contrastive loss."""

    def __init__(self, arch: str, image_size: int, patch_size: int, dim: int, mlp_dim: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.base_encoder = vit_backbone(arch, image_size, patch_size)
        self.momentum_encoder = vit_backbone(arch, image_size, patch_size)
        width = WIDTHS[arch][0]
        self.base_encoder.head = bn_mlp(3, width, mlp_dim, dim)
        self.momentum_encoder.head = bn_mlp(3, width, mlp_dim, dim)
        self.predictor = bn_mlp(2, dim, mlp_dim, dim)
        for base, momentum in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True):
            momentum.data.copy_(base.data)
            momentum.requires_grad = False

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        for base, momentum in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True):
            momentum.data = momentum.data * m + base.data * (1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = F.normalize(q, dim=1), F.normalize(gather_all(k), dim=1)
        logits = q @ k.T / self.temperature
        labels = torch.arange(q.shape[0]) + q.shape[0] * dist.get_rank()
        loss = F.cross_entropy(logits, labels) * 2 * self.temperature
        return loss, (logits.argmax(dim=1) == labels).float().mean()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        (loss_12, acc_12), (loss_21, acc_21) = self.contrastive_loss(q1, k2), self.contrastive_loss(q2, k1)
        return loss_12 + loss_21, (acc_12 + acc_21) / 2


class ReferenceV3Trainer:
    """moco-v3's loop: DDP, AdamW on every parameter, lr and momentum set per step."""

    def __init__(self, model: ReferenceMoCoV3, peak_lr: float, weight_decay: float, warmup: int, steps: int, m0: float):
        self.model = model
        self.ddp = nn.parallel.DistributedDataParallel(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), peak_lr, weight_decay=weight_decay)
        self.peak_lr, self.warmup, self.steps, self.m0 = peak_lr, warmup, steps, m0
        self.step = 0

    def learning_rate(self) -> float:
        if self.step < self.warmup:
            return self.peak_lr * self.step / self.warmup
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * (self.step - self.warmup) / (self.steps - self.warmup)))

    def momentum(self) -> float:
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * self.step / self.steps)) * (1.0 - self.m0)

    def train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; the loss and the instance accuracy (how often the positive logit is the largest)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        loss, inst_acc = self.ddp(view1, view2, self.momentum())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.detach(), inst_acc.detach()
