"""The single-process engine (benchmarks, GPU checks): the house step against a hand-written one, the skip of a
non-finite step, and the precision policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco_scale.config import MocoConfig
from moco_scale.engine.local import LocalEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet


def _model() -> MoCo:
    torch.manual_seed(0)
    return MoCo(build_resnet("resnet18"), MocoConfig(dim=16, queue_size=32, bn_groups=2), cuda_graph_ema=False).train()


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)


def _plain_step(model: MoCo, optimizer: torch.optim.Optimizer, views: tuple, m: float, step: int) -> float:
    """fb/moco's order, written out: key <- m key + (1 - m) query, then the InfoNCE against the queue, SGD."""
    with torch.no_grad():
        for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
            k.mul_(m).add_(q, alpha=1 - m)
    q = F.normalize(model.encoder_q(views[0]), dim=1)
    k = model.encode_keys(views[1], step)
    negatives = model.queue.keys.clone()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / model.temperature
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.queue.enqueue(k)
    return loss.item()


def test_a_step_is_the_hand_written_step() -> None:
    ours, reference = _model(), _model()
    engine = LocalEngine(ours, torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9), "fp32")
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for step, m in enumerate([0.9, 0.99, 0.5]):
        result = engine.train_step(*_views(step), lr=0.5, momentum=m, step=step)
        ref_loss = _plain_step(reference, ref_optimizer, _views(step), m, step)
        assert not result.skipped and result.loss.item() == pytest.approx(ref_loss, rel=1e-4)
    # fp32 sums in another order (the fused EMA, the queue's logits), grown over 3 steps at lr 0.5: a relative
    # error per tensor of 1e-4 at most; the EMA or the enqueue in another place of the step gives 1e-2 or more.
    for name, tensor in reference.state_dict().items():
        error = (ours.state_dict()[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-12)
        assert error < 1e-4, (name, error.item())


def test_a_non_finite_step_is_skipped_and_rolled_back() -> None:
    model = _model()
    engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=0.5), "fp32")
    engine.train_step(*_views(0), lr=0.5, momentum=0.9, step=0)
    query_before = {n: p.clone() for n, p in model.encoder_q.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    view1, view2 = _views(1)
    view1[0, 0, 0, 0] = float("nan")
    result = engine.train_step(view1, view2, lr=0.5, momentum=0.9, step=1)
    assert result.skipped
    assert all(torch.equal(p, query_before[n]) for n, p in model.encoder_q.named_parameters())
    assert all(torch.equal(b, buffers_before[n]) for n, b in model.named_buffers())  # BN statistics, queue
    assert all(p.grad is None for p in model.parameters())


def test_bf16_computes_in_bf16_and_keeps_fp32_state() -> None:
    model = _model()
    engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16")
    seen: list[torch.dtype] = []
    model.encoder_q.backbone.conv1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    result = engine.train_step(*_views(0), lr=0.1, momentum=0.9, step=0)
    assert seen == [torch.bfloat16] and result.loss.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        LocalEngine(model, engine.optimizer, "fp16")
