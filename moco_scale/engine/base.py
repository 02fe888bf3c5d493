"""The small interface the training loop uses, whatever the backend."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from moco_scale.moco import MoCo, MocoOutput
from moco_scale.observe import profiling

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # engine.precision's

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]  # built on the parameters the backend trains


class StepResult(NamedTuple):
    loss: torch.Tensor
    inst_acc: torch.Tensor
    skipped: bool  # some rank's loss or gradient was not finite: no optimizer step, running statistics kept
    stop: bool  # some rank was asked to stop (a signal): every rank finishes this step, then saves


def any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: whether any of ``tensors`` holds a NaN or infinity, or is so large that its norm
    overflows (one multi-tensor op, no host sync)."""
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


def agree(nonfinite: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """Whether any rank saw a non-finite step, and whether any rank was asked to stop: one all-reduce
    of two flags, the only host sync a step makes (without a process group, this process's own flags)."""
    flags = torch.stack([nonfinite.float(), nonfinite.new_tensor(float(stop_requested), dtype=torch.float32)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    skipped, stop = flags.tolist()
    return skipped > 0, stop > 0


@contextlib.contextmanager
def optimizer_step_skipped(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within, ``optimizer.step()`` does nothing: a backend's own step (DeepSpeed's) then runs its usual
    bookkeeping (zeroing gradients, copying unchanged master weights back) but changes no weight or state."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


class StepRollback:
    """What a skipped step must take back: the running statistics (BN buffers of both encoders and the
    predictor, copied before the step) and the keys the step put into the queue."""

    def __init__(self, model: MoCo):
        self.model = model
        self.saved: list[torch.Tensor] = []

    def _statistics(self) -> list[torch.Tensor]:
        return [b for name, b in self.model.named_buffers() if not name.startswith("queue.")]

    def save(self) -> None:
        """Before the step."""
        self.saved = [b.clone() for b in self._statistics()]

    def apply(self) -> None:
        """After a skipped step."""
        torch._foreach_copy_(self._statistics(), self.saved)
        if self.model.queue is not None:
            self.model.queue.undo_enqueue()


class CheckpointLayout(ABC):
    """The files a backend writes into a checkpoint folder, beside moco_scale's rank files, and how to read the
    module back whole on the CPU without a process group (for export, the probe, inspection)."""

    description: str  # what its files are, for an error naming what a folder lacks

    @abstractmethod
    def wrote(self, folder: Path) -> bool:
        """Whether ``folder`` holds any file of this backend's."""

    @abstractmethod
    def writer(self, name: str) -> int | None:
        """The rank that writes this backend's file ``name`` (0 for a shared one); ``None``: not its file."""

    @abstractmethod
    def expected_files(self, folder: Path, world_size: int) -> list[Path]:
        """Every file this backend's save on ``world_size`` ranks writes into ``folder``."""

    @abstractmethod
    def check(self, folder: Path) -> None:
        """Beyond the files' presence: a one-line ``CheckpointError`` for one that is damaged."""

    @abstractmethod
    def read_module(self, folder: Path) -> dict[str, torch.Tensor]:
        """Every tensor of the MoCo module (both encoders, heads, queue, BN buffers), whole, on the CPU."""


class StepEngine(ABC):
    """Owns the wrapped model, the optimizer and the precision policy; :meth:`train_step` is the same MoCo
    step on every backend, and a backend supplies its mechanics (forward, backward, finiteness, update).

    Profiling stages are marked here, at the boundary, and none in the algorithm: ``ema``; ``key_fwd``
    and ``queue_loss`` (calls of ``MoCo.encode_keys``, ``MoCo.contrast`` and the queue's ``enqueue``);
    ``query_fwd_bwd`` (the rest of the forward and the backward); ``optimizer``; a backend adds ``comm``.
    """

    model: MoCo  # the unwrapped module: encoders, head, queue
    optimizer: torch.optim.Optimizer  # what the learning rate is set on
    step_rollback: StepRollback

    def train_step(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        lr: float,
        momentum: float,
        step: int,
        stop_requested: bool = False,
    ) -> StepResult:
        """One momentum update, forward, backward and optimizer step at learning rate ``lr`` and key momentum
        ``momentum``.

        The momentum update comes first, before the forward: it reads the query encoder as the previous
        optimizer step left it, as fb/moco's does, and a sharding backend's forward gathers the parameters
        it moves (ZeRO-3 prefetches the key encoder's). Between backward and the optimizer step the ranks
        agree (:func:`agree`) on whether the step is finite everywhere, and on whether any rank has
        ``stop_requested``. A non-finite step is skipped on every rank: no optimizer step, and the running
        statistics and the queue are restored."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.step_rollback.save()
        with profiling.stage("ema"):
            self.model.momentum_update(momentum)
        queue = self.model.queue
        with (
            profiling.stage("query_fwd_bwd"),
            profiling.timed_calls(self.model, "encode_keys", "key_fwd"),
            profiling.timed_calls(self.model, "contrast", "queue_loss"),
            profiling.timed_calls(queue, "enqueue", "queue_loss") if queue is not None else contextlib.nullcontext(),
        ):
            out = self._forward(view1, view2, step)
            self._backward(out.loss)
        skipped, stop = agree(~torch.isfinite(out.loss.detach()) | self._nonfinite_gradients(), stop_requested)
        with profiling.stage("optimizer"):
            if skipped:
                self.step_rollback.apply()
            self._optimizer_step(skipped)
        return StepResult(out.loss.detach(), out.inst_acc.detach(), skipped, stop)

    @abstractmethod
    def _forward(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> MocoOutput:
        """The model's forward under the backend's wrapper and precision policy."""

    @abstractmethod
    def _backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss``, reduced across the ranks."""

    @abstractmethod
    def _nonfinite_gradients(self) -> torch.Tensor:
        """A 0-d bool tensor: whether this rank's (share of the) gradients holds a non-finite value."""

    @abstractmethod
    def _optimizer_step(self, skipped: bool) -> None:
        """The optimizer step, or (``skipped``) the backend's bookkeeping without one; gradients are cleared."""

    def query_backbone(self) -> nn.Module:
        """The query backbone, whole, to evaluate (a collective call under a sharding backend)."""
        return self.model.encoder_q.backbone


class TrainEngine(StepEngine):
    """A backend the training loop runs: the step, and the checkpoints it writes and reads back."""

    layout: CheckpointLayout  # the files its save_checkpoint writes
    reshardable: bool  # whether its checkpoints resume on another world size

    @abstractmethod
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """Every rank writes its shard of the model and optimizer state under ``save_dir/tag``."""

    @abstractmethod
    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int) -> None:
        """Restore what :meth:`save_checkpoint` wrote on ``saved_world_size`` ranks, re-cutting sharded
        state when the world size has changed."""


class WholeBackboneCopy:
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
