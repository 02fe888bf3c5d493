"""The small interface the training loop uses, whatever the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moco_scale.moco import MoCo, MocoOutput


class TrainEngine(ABC):
    """Owns the wrapped model, the optimizer and the precision policy."""

    model: MoCo  # the unwrapped module: encoders, head, queue

    @abstractmethod
    def train_step(
        self, view1: torch.Tensor, view2: torch.Tensor, *, lr: float, momentum: float, step: int
    ) -> MocoOutput:
        """One forward, backward and optimizer step at learning rate ``lr`` and key momentum ``momentum``."""

    @abstractmethod
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        """Every rank writes its shard of the model and optimizer state under ``save_dir/tag``."""

    @abstractmethod
    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int) -> None:
        """Restore what :meth:`save_checkpoint` wrote on ``saved_world_size`` ranks, re-cutting sharded
        state when the world size has changed."""

    def query_backbone(self) -> torch.nn.Module:
        """The backbone to evaluate and export."""
        return self.model.encoder_q.backbone
