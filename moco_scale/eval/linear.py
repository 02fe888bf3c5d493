"""Linear classification on a frozen backbone (MoCo's linear-evaluation protocol).

The backbone stays in eval mode (BN uses its running statistics) without gradients; only a linear
layer on its pooled features trains, with SGD and the cosine (or step, or constant) schedule of
``moco_scale.optim``. Distributed, each rank trains on its own batches and the linear layer's
gradients are averaged with one ``all_reduce``, so the layer stays identical on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moco_scale.config import ModelConfig
from moco_scale.distributed.comm import world_size
from moco_scale.models import build_backbone
from moco_scale.optim import learning_rate
from moco_scale.weights import WeightsError


@dataclass(frozen=True)
class LinearSchedule:
    """The head's SGD: ``steps`` steps to a peak lr (warmed up linearly over ``warmup_steps``, then ``schedule``)."""

    steps: int
    peak_lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0


def frozen_backbone(
    model: ModelConfig, image_size: int, weights: dict[str, torch.Tensor] | None, seed: int = 0
) -> nn.Module:
    """The backbone ``model`` describes, for ``image_size`` px, in eval mode with frozen parameters: ``weights``
    loaded strictly, or a random init drawn from ``seed`` (the same on every rank). Weights that do not fit are
    a one-line error."""
    torch.manual_seed(seed)
    arch, width, small_stem = model.arch, model.width, model.small_stem
    backbone = build_backbone(model, image_size)
    if weights is not None:
        expected = backbone.state_dict()
        missing = sorted(expected.keys() - weights.keys())
        unexpected = sorted(weights.keys() - expected.keys())
        misshapen = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
        if missing or unexpected or misshapen:
            first = (missing or unexpected or misshapen)[0]
            raise WeightsError(
                f"the weights do not fit {arch} (width {width}, small_stem {small_stem}): {len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(misshapen)} misshapen tensors, e.g. {first!r}"
            )
        backbone.load_state_dict(weights, strict=True)
    return backbone.requires_grad_(False).eval()


def linear_head(feature_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The classifier, initialised as in MoCo's linear evaluation: weights N(0, 0.01), zero bias."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def average_gradients(module: nn.Module) -> None:
    """Replace each gradient of ``module`` by its mean over the ranks, in one ``all_reduce``."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(averaged.view_as(grad))


def train_linear(
    backbone: nn.Module,
    head: nn.Linear,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    sgd: LinearSchedule,
    progress: bool = False,
) -> list[float]:
    """Train ``head`` on the frozen backbone's features of ``sgd.steps`` batches; returns this rank's loss per step."""
    backbone.eval()
    head.train()
    steps, peak_lr = sgd.steps, sgd.peak_lr
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    distributed = dist.is_initialized() and world_size() > 1
    losses = []
    bar = tqdm(total=steps, disable=not progress, desc="linear probe", dynamic_ncols=True)
    for step in range(steps):
        images, labels = next(batches)
        with torch.no_grad():
            features = backbone(images.to(device, non_blocking=True)).float()
        loss = F.cross_entropy(head(features), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            average_gradients(head)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, sgd.warmup_steps, sgd.schedule)
        optimizer.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


@torch.no_grad()
def evaluate(
    backbone: nn.Module,
    head: nn.Linear,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and the number of samples, summed over all ranks."""
    backbone.eval()
    head.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples
    for images, labels in batches:
        logits = head(backbone(images.to(device, non_blocking=True)).float())
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(1).sum()
        counts[2] += len(labels)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(counts)
    samples = int(counts[2])
    if not samples:
        raise ValueError("no samples to evaluate")
    return {"top1": 100.0 * float(counts[0]) / samples, "top5": 100.0 * float(counts[1]) / samples, "samples": samples}
