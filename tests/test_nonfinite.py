"""A non-finite step is skipped on every rank, whichever rank saw it and whatever the backend: no optimizer
step, nothing non-finite in the weights, the key encoder, the running statistics or the queue."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_ranks
from torch.distributed.tensor import DTensor

from moco_scale.config import MocoConfig
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.moco import MoCo
from moco_scale.moco.queue import KeyQueue
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer

MOMENTUM = 0.9


def test_queue_enqueue_is_undone() -> None:
    queue = KeyQueue(8, 4)
    queue.enqueue(torch.randn(6, 4))
    before, ptr = queue.keys.clone(), queue.ptr.clone()
    keys = torch.randn(3, 4)
    queue.enqueue(keys)  # wraps around: rows 6, 7, 0
    expected = before.clone()
    expected[[6, 7, 0]] = keys
    assert torch.equal(queue.keys, expected) and int(queue.ptr) == 1
    queue.undo_enqueue()
    assert torch.equal(queue.keys, before) and torch.equal(queue.ptr, ptr)
    queue.undo_enqueue()  # only the last enqueue, and only once
    assert torch.equal(queue.keys, before)


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _snapshot(model: MoCo, engine, backend: str) -> dict[str, torch.Tensor]:
    """Every tensor of the module, whole, and this rank's optimizer state."""
    if backend == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        state = {k: _gathered(v) for k, v in model.state_dict().items()}
    optimizer = engine.base_optimizer if backend != "fsdp" else engine.optimizer
    for i, param_state in enumerate(optimizer.state.values()):
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                state[f"optimizer.{i}.{key}"] = _gathered(value)
    return state


def _run_backend(rank: int, world: int, backend: str) -> None:
    torch.manual_seed(0)
    model = MoCo(
        build_resnet("resnet18"), MocoConfig(dim=16, queue_size=64), world_size=world, cuda_graph_ema=False
    ).train()
    armed = {"poison": False}
    model.encoder_q.head.register_forward_hook(lambda m, i, out: _PoisonGradient.apply(out) if armed["poison"] else out)

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)

    if backend == "fsdp":
        engine = FSDPEngine(model, make_optimizer, "fp32")
    else:
        engine = DeepSpeedEngine(model, make_optimizer, "fp32", int(backend.removeprefix("zero")), 8, world)
    g = torch.Generator().manual_seed(rank)

    def step(index: int, nan_input: bool = False) -> bool:
        x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        if nan_input:
            x1[0, 0, 0, 0] = x2[0, 0, 0, 0] = math.nan
        result = engine.train_step(x1, x2, lr=0.1, momentum=MOMENTUM, step=index)
        assert not result.stop
        return result.skipped

    assert not step(0)
    assert not step(1)  # the optimizer holds momentum now
    for index, (nan_input, poison) in enumerate([(rank == 1, False), (False, rank == 0)], start=2):
        before = _snapshot(model, engine, backend)
        armed["poison"] = poison
        assert step(index, nan_input), f"{backend}: step {index} was not skipped on rank {rank}"
        armed["poison"] = False
        after = _snapshot(model, engine, backend)
        for name, value in before.items():
            if name.startswith("encoder_k.") and value.is_floating_point() and "running" not in name:
                # The momentum update ran (on the unchanged query encoder); nothing else moved.
                query = before["encoder_q." + name.removeprefix("encoder_k.")]
                expected = MOMENTUM * value + (1 - MOMENTUM) * query
                torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=f"{backend} {name}")
            else:
                assert torch.equal(after[name], value), f"{backend}: step {index} changed {name}"
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    before = _snapshot(model, engine, backend)
    assert not step(4)  # training goes on
    after = _snapshot(model, engine, backend)
    assert not torch.equal(after["encoder_q.backbone.conv1.weight"], before["encoder_q.backbone.conv1.weight"])


def _run_all(rank: int, world: int) -> None:
    for backend in ("zero0", "zero2", "zero3", "fsdp"):
        _run_backend(rank, world, backend)


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_on_every_rank_and_backend() -> None:
    run_ranks(_run_all, 2)
