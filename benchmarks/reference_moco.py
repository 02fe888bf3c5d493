"""A plain MoCo v1/v2 training step written the way fb/moco's ``builder.py`` and ``main_moco.py`` do it.

It is the baseline ``benchmarks/throughput.py --compare-reference`` measures our engine against, on
the same model, batch, data and threads:

- a torchvision ResNet whose ``fc`` outputs ``dim`` features (v2: ``fc`` becomes Linear-ReLU-fc);
- the key encoder a copy of the query encoder, updated parameter by parameter in a Python loop
  (``k.data = k.data * m + q.data * (1 - m)``, a new tensor per parameter);
- shuffle-BN by all-gathering the global key batch, rank 0 drawing a permutation and broadcasting
  it, each rank encoding its slice, and all-gathering the keys again to undo the permutation;
- a queue of shape ``(dim, K)`` written in place by the gathered keys (K a multiple of the global
  batch), logits ``[l_pos, l_neg] / T`` with label 0, ``nn.CrossEntropyLoss``;
- the whole module in ``torch.nn.parallel.DistributedDataParallel`` with its defaults (buffers,
  the queue included, broadcast from rank 0 at every forward; gradients all-reduced in buckets
  during the backward pass), fp32, and ``torch.optim.SGD(model.parameters(), lr, momentum,
  weight_decay)`` with its defaults.

The stages carry the same ``profiling.stage`` names as our engine's, so the breakdowns line up;
here ``query_fwd_bwd`` includes DDP's gradient all-reduce, which overlaps the backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from moco_scale.observe import profiling


def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated in rank order: one all_gather into a list, then a cat."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class ReferenceMoCo(nn.Module):
    """Query and key encoders, the queue and the InfoNCE logits; ``forward`` returns (logits, labels)."""

    def __init__(self, arch: str, dim: int, mlp: bool, queue_size: int, momentum: float, temperature: float):
        super().__init__()
        self.momentum, self.temperature = momentum, temperature
        self.encoder_q = getattr(torchvision.models, arch)(num_classes=dim)
        self.encoder_k = getattr(torchvision.models, arch)(num_classes=dim)
        if mlp:
            for encoder in (self.encoder_q, self.encoder_k):
                width = encoder.fc.weight.shape[1]
                encoder.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), encoder.fc)
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            k.data.copy_(q.data)
            k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        with profiling.stage("ema"):
            for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
                k.data = k.data * self.momentum + q.data * (1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = gather_all(keys)
        ptr, size = int(self.queue_ptr), self.queue.shape[1]
        if size % keys.shape[0]:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {keys.shape[0]}")
        self.queue[:, ptr : ptr + keys.shape[0]] = keys.T
        self.queue_ptr[0] = (ptr + keys.shape[0]) % size

    @torch.no_grad()
    def shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the randomly permuted global batch, and the inverse permutation."""
        everyone = gather_all(x)
        permutation = torch.randperm(everyone.shape[0], device=x.device)
        dist.broadcast(permutation, src=0)
        mine = permutation.view(dist.get_world_size(), -1)[dist.get_rank()]
        return everyone[mine], torch.argsort(permutation)

    @torch.no_grad()
    def unshuffle(self, y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        everyone = gather_all(y)
        return everyone[inverse.view(dist.get_world_size(), -1)[dist.get_rank()]]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with profiling.stage("query_fwd_bwd"):
            q = F.normalize(self.encoder_q(im_q), dim=1)
        self.momentum_update()
        with profiling.stage("key_fwd"), torch.no_grad():
            shuffled, inverse = self.shuffle(im_k)
            k = F.normalize(self.encoder_k(shuffled), dim=1)
            k = self.unshuffle(k, inverse)
        with profiling.stage("queue_loss"):
            l_pos = (q * k).sum(dim=1, keepdim=True)
            l_neg = q @ self.queue.clone().detach()
            logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            self.enqueue(k)
        return logits, labels


class ReferenceTrainer:
    """fb/moco's training step: DDP around the whole module, cross-entropy, SGD with its defaults."""

    def __init__(self, model: ReferenceMoCo, lr: float, momentum: float, weight_decay: float):
        self.model = model
        self.ddp = nn.parallel.DistributedDataParallel(model)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)

    def train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; the loss and the instance accuracy (how often the positive logit is the largest)."""
        logits, labels = self.ddp(im_q=view1, im_k=view2)
        with profiling.stage("queue_loss"):
            loss = self.criterion(logits, labels)
        with profiling.stage("query_fwd_bwd"):
            self.optimizer.zero_grad()
            loss.backward()
        with profiling.stage("optimizer"):
            self.optimizer.step()
        return loss.detach(), (logits.argmax(dim=1) == labels).float().mean()
