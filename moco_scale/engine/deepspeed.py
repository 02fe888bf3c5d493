"""DeepSpeed backend: the DeepSpeed JSON is generated from the run config, and the engine owns precision.

Precision policy. Parameters, BatchNorm buffers, the queue and the optimizer state stay in
fp32; convolutions and linear layers run in bf16 or fp16 under ``torch.autocast`` (DeepSpeed's
``torch_autocast`` section); the loss is computed in fp32; fp16 uses dynamic loss scaling.
DeepSpeed's own ``bf16``/``fp16`` modes are never used: they cast parameters but not buffers,
which breaks BatchNorm.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moco_scale.engine.base import TrainEngine
from moco_scale.moco import MoCo, MocoOutput

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(precision: str, zero_stage: int, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The one DeepSpeed JSON, derived from the run config."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our own SGD/LARS/AdamW, not DeepSpeed's JIT-built ones
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[precision]}
    return config


class DeepSpeedEngine(TrainEngine):
    """Wraps :class:`MoCo` in ``deepspeed.initialize``; only the query side has trainable parameters."""

    def __init__(
        self,
        model: MoCo,
        optimizer: torch.optim.Optimizer,
        precision: str,
        zero_stage: int,
        micro_batch: int,
        world_size: int,
    ):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        self.model = model
        self.config = deepspeed_config(precision, zero_stage, micro_batch, world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)

    def train_step(
        self, view1: torch.Tensor, view2: torch.Tensor, *, lr: float, momentum: float, step: int
    ) -> MocoOutput:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out: MocoOutput = self.engine(view1, view2, momentum=momentum, step=step)
        self.engine.backward(out.loss)
        self.engine.step()
        return MocoOutput(out.loss.detach(), out.inst_acc.detach())

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler, which DeepSpeed's ``torch_autocast`` mode keeps but does not checkpoint."""
        return self.engine.torch_autocast_z0_gradscaler or getattr(self.optimizer, "torch_autocast_gradscaler", None)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        scaler = self._grad_scaler()
        if scaler is not None:
            client_state = {**client_state, "grad_scaler": scaler.state_dict()}
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        load_path, client_state = self.engine.load_checkpoint(load_dir, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {load_dir}")
        scaler = self._grad_scaler()
        if scaler is not None and "grad_scaler" in client_state:
            scaler.load_state_dict(client_state["grad_scaler"])
