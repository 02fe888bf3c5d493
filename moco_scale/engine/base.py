"""The small interface the training loop uses, whatever the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from moco_scale.moco import MoCo, MocoOutput

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # engine.precision's

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]  # built on the parameters the backend trains


class TrainEngine(ABC):
    """Owns the wrapped model, the optimizer and the precision policy."""

    model: MoCo  # the unwrapped module: encoders, head, queue
    reshardable: bool  # whether its checkpoints resume on another world size

    @abstractmethod
    def train_step(
        self, view1: torch.Tensor, view2: torch.Tensor, *, lr: float, momentum: float, step: int
    ) -> MocoOutput:
        """One forward, backward and optimizer step at learning rate ``lr`` and key momentum ``momentum``."""

    @abstractmethod
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """Every rank writes its shard of the model and optimizer state under ``save_dir/tag``."""

    @abstractmethod
    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int) -> None:
        """Restore what :meth:`save_checkpoint` wrote on ``saved_world_size`` ranks, re-cutting sharded
        state when the world size has changed."""

    def query_backbone(self) -> nn.Module:
        """The query backbone, whole, to evaluate (a collective call under a sharding backend)."""
        return self.model.encoder_q.backbone


class ShardedBackbone:
    """A whole copy of a sharded query backbone for evaluation, built once from ``factory`` (the
    backbone's constructor) and refreshed from the gathered weights at each call."""

    def __init__(self, factory: Callable[[], nn.Module]):
        self.factory = factory
        self.copy: nn.Module | None = None

    def __call__(self, state: dict[str, torch.Tensor]) -> nn.Module:
        if self.copy is None:
            self.copy = self.factory().to(next(iter(state.values())).device)
        self.copy.load_state_dict(state)
        return self.copy
