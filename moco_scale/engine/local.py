"""The MoCo step on one device in one process, without DeepSpeed, FSDP or a process group.

Our module and optimizer are stepped as every backend steps them (``StepEngine.train_step``: momentum
update, forward, backward, the finiteness check, the optimizer step or the rollback), the compute under
``torch.autocast`` at the precision's dtype while parameters, buffers and the queue stay fp32. For the
benchmarks and the GPU checks, which must run where DeepSpeed is missing; it writes no checkpoints.
"""

from __future__ import annotations

import torch

from moco_scale.engine.base import COMPUTE_DTYPES, StepEngine, StepRollback, any_nonfinite
from moco_scale.moco import MoCo, MocoOutput

PRECISIONS = ("fp32", "bf16")  # fp16 would need a loss scaler, which the sharded backends own


class LocalEngine(StepEngine):
    def __init__(self, model: MoCo, optimizer: torch.optim.Optimizer, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(f"LocalEngine runs {' or '.join(PRECISIONS)}, got {precision!r}")
        self.model, self.optimizer = model, optimizer
        self.compute_dtype = COMPUTE_DTYPES[precision]
        self.step_rollback = StepRollback(model)

    def _forward(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> MocoOutput:
        lower = self.compute_dtype != torch.float32
        with torch.autocast(view1.device.type, self.compute_dtype, enabled=lower):
            return self.model(view1, view2, step=step)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _nonfinite_gradients(self) -> torch.Tensor:
        return any_nonfinite([p.grad for p in self.model.parameters() if p.grad is not None])

    def _optimizer_step(self, skipped: bool) -> None:
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
