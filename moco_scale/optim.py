"""Optimisers (SGD, LARS, AdamW; apex's fused kernels when apex imports) and the schedules.

Schedules are pure functions of the step and the configured run length, never of when a run
was stopped, so a resumed run follows the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

try:  # optional: NVIDIA apex's fused optimisers, when someone built it
    from apex.optimizers import FusedSGD as ApexFusedSGD  # type: ignore[import-not-found]
except ImportError:
    ApexFusedSGD = None


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as MoCo v3 uses it.

    Parameters with one dimension (biases, BN) get neither weight decay nor the trust ratio.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


NO_DECAY_NAMES = ("class_token", "pos_embedding")  # a ViT's tokens and position embedding are not weights


def parameter_groups(model: nn.Module, weight_decay: float, exclude_1d: bool) -> list[dict]:
    """Trainable parameters, with weight decay off, when ``exclude_1d``, for biases, norms, a ViT's class token
    and position embedding (AdamW, as MAE and timm do; moco-v3's AdamW decays every parameter)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
            (no_decay if exclude_1d and exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    trust_coefficient: float = 0.001,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """SGD (MoCo v1/v2), LARS (v3) or AdamW, with torch's fused/foreach kernels where they apply."""
    if name == "sgd":
        groups = parameter_groups(model, weight_decay, exclude_1d=False)
        # FSDP's sharded parameters (DTensors) have no fused kernel, apex's or torch's: foreach there.
        sharded = any(isinstance(p, DTensor) for group in groups for p in group["params"])
        if ApexFusedSGD is not None and device_type == "cuda" and not sharded:
            return ApexFusedSGD(groups, lr=lr, momentum=momentum)
        # torch's fused SGD, on the CPU too: one pass per tensor, 2-4x faster there than foreach or the loop.
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=None if sharded else True)
    if name == "lars":
        return LARS(
            parameter_groups(model, weight_decay, exclude_1d=False),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    if name == "adamw":
        groups = parameter_groups(model, weight_decay, exclude_1d=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda" or None)
    raise ValueError(f"unknown optimizer {name!r}; choices: sgd, lars, adamw")


def linear_scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``base_lr`` is per 256 images."""
    return base_lr * global_batch / 256


def learning_rate(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    milestones: tuple[float, ...] = (0.6, 0.8),
) -> float:
    """Linear warm-up to ``peak_lr``, then cosine decay to 0 at ``total_steps``, or x0.1 at each
    milestone (a fraction of the run; MoCo v1's 120 and 160 of 200 epochs), or constant."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        return peak_lr * 0.1 ** sum(step >= m * total_steps for m in milestones)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def key_momentum(step: int, total_steps: int, base_momentum: float, schedule: str = "constant") -> float:
    """MoCo v1/v2: constant. MoCo v3: cosine from ``base_momentum`` to 1."""
    if schedule == "constant":
        return base_momentum
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * progress))
