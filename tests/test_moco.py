"""The MoCo module against a plain re-computation of the papers' losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks

from moco_scale.config import MocoConfig
from moco_scale.distributed import shuffle
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet


def _model(version: str, shuffle_bn: str = "none", **kwargs) -> MoCo:
    torch.manual_seed(0)
    cfg = MocoConfig(version, dim=16, mlp_dim=32, queue_size=24, temperature=0.2, shuffle_bn=shuffle_bn, bn_groups=2)
    return MoCo(build_resnet("resnet18"), cfg, cuda_graph_ema=False, **kwargs).train()


def _views(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)


def test_heads_follow_the_papers() -> None:
    assert isinstance(_model("v1").encoder_q.head, torch.nn.Linear)
    v2_head = _model("v2").encoder_q.head
    assert [type(m).__name__ for m in v2_head] == ["Linear", "ReLU", "Linear"]
    v3 = _model("v3")
    assert sum(isinstance(m, torch.nn.Linear) for m in v3.encoder_q.head) == 3
    assert sum(isinstance(m, torch.nn.Linear) for m in v3.predictor) == 2
    assert v3.queue is None and not hasattr(v3.encoder_k, "predictor")
    assert not any(p.requires_grad for p in v3.encoder_k.parameters())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_queue_loss_matches_reference(version: str) -> None:
    model = _model(version)
    reference = copy.deepcopy(model)
    x1, x2 = _views()
    m = 0.9
    queue_before = model.queue.keys.clone()
    model.momentum_update(m)
    out = model(x1, x2, step=0)
    out.loss.backward()
    # Reference, as in fb/moco: momentum update, encode, logits [pos, queue] / T, label 0.
    with torch.no_grad():
        for q, k in zip(reference.encoder_q.parameters(), reference.encoder_k.parameters(), strict=True):
            k.mul_(m).add_(q, alpha=1 - m)
        k = F.normalize(reference.encoder_k(x2), dim=1)
    q = F.normalize(reference.encoder_q(x1), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(model.encoder_q.parameters(), reference.encoder_q.parameters(), strict=True):
        # lerp and mul+add round differently in the last bit; BN on a batch of 4 amplifies that a little.
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-4 * ref.grad.abs().max().item())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    torch.testing.assert_close(model.queue.keys[:4], k)  # the new keys were enqueued
    assert int(model.queue.ptr) == 4
    assert out.inst_acc == (logits.argmax(1) == 0).float().mean()


def test_v3_symmetric_loss_matches_reference() -> None:
    model = _model("v3")
    reference = copy.deepcopy(model)
    x1, x2 = _views()
    model.momentum_update(0.99)
    out = model(x1, x2, step=0)
    with torch.no_grad():
        for q, k in zip(reference.encoder_q.parameters(), reference.encoder_k.parameters(), strict=True):
            k.mul_(0.99).add_(q, alpha=0.01)
        k1, k2 = reference.encoder_k(x1), reference.encoder_k(x2)

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        return F.cross_entropy(logits, torch.arange(4)) * 2 * 0.2

    q1 = reference.predictor(reference.encoder_q(x1))
    q2 = reference.predictor(reference.encoder_q(x2))
    torch.testing.assert_close(out.loss, ctr(q1, k2) + ctr(q2, k1), rtol=1e-5, atol=1e-5)


def test_single_process_shuffle_bn_changes_keys_but_not_their_order() -> None:
    shuffled = _model("v2", shuffle_bn="shuffle")
    x1, x2 = _views(8)
    keys_seen = []
    shuffled.queue.enqueue = keys_seen.append  # capture the keys instead of enqueuing them
    shuffled(x1, x2, step=3)
    k = keys_seen[0]
    with torch.no_grad():
        plain_groups = copy.deepcopy(shuffled.encoder_k)
        expected_rows = F.normalize(plain_groups(x2), dim=1)  # split BN without the shuffle
    assert k.shape == expected_rows.shape
    assert (k - expected_rows).abs().max() > 1e-3  # the groups hold other samples after the shuffle
    # Row i is still image i's key: encoding image i with the same group-mates reproduces it.
    plan = shuffle.plan_for_step(0, 3, 8, torch.device("cpu"))
    with torch.no_grad():
        direct = F.normalize(
            shuffle.unshuffle(copy.deepcopy(shuffled.encoder_k)(shuffle.shuffle(x2, plan)), plan), dim=1
        )
    torch.testing.assert_close(k, direct, rtol=1e-5, atol=1e-5)


def _check_v2_two_ranks(rank: int, world: int) -> None:
    model = _model("v2", shuffle_bn="shuffle", world_size=world)
    x1, x2 = _views(4, seed=rank + 1)
    for step in range(3):
        model.momentum_update(0.99)
        out = model(x1, x2, step=step)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    gathered = [torch.empty_like(model.queue.keys) for _ in range(world)]
    torch.distributed.all_gather(gathered, model.queue.keys)
    assert torch.equal(gathered[0], gathered[1])  # every rank enqueued the same global batch
    assert int(model.queue.ptr) == (3 * 4 * world) % 24


def test_two_rank_forward_keeps_queues_identical() -> None:
    run_ranks(_check_v2_two_ranks, 2)


@pytest.mark.parametrize("shuffle_bn", ["none", "shuffle"])
def test_channels_last_key_input_changes_layout_not_result(shuffle_bn: str) -> None:
    plain, fast = _model("v2", shuffle_bn), _model("v2", shuffle_bn, key_channels_last=True)
    seen = []
    fast.encoder_k.backbone.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    view1, view2 = _views()
    expected, got = plain(view1, view2, step=0), fast(view1, view2, step=0)
    assert (
        seen
        and seen[0].is_contiguous(memory_format=torch.channels_last)
        and not view2.is_contiguous(memory_format=torch.channels_last)
    )
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.queue.keys, plain.queue.keys, rtol=1e-4, atol=1e-5)
