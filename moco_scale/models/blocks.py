"""What every backbone family's repeated block shares: it can recompute its activations in the backward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointable(nn.Module):
    """Mixed in before a block class: with ``activation_checkpointing`` set, the block keeps only its input
    for the backward pass and runs its forward again there (``torch.utils.checkpoint``, non-reentrant).
    The recomputation leaves the block's buffers as the forward left them (BatchNorm's running statistics
    move once per step, not twice). Nothing changes without gradients (the key encoder)."""

    activation_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = super().forward
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(body, x, use_reentrant=False, context_fn=self._contexts)
        return body(x)

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), self._buffers_kept()

    @contextlib.contextmanager
    def _buffers_kept(self) -> Iterator[None]:
        buffers = list(self.buffers())
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
