"""The DeepSpeed engine: a step is a plain SGD step; on 2 gloo ranks ZeRO 0/1/2 agree, and every precision
keeps BatchNorm working."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_ranks

from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer


def _train(rank: int, world: int, precision: str, zero_stage: int, out: str) -> None:
    torch.manual_seed(0)
    model = MoCo(
        build_resnet("resnet18"),
        version="v2",
        dim=16,
        queue_size=64,
        key_bn="shuffle",
        world_size=world,
        cuda_graph_ema=False,
    ).train()
    engine = DeepSpeedEngine(
        model, build_optimizer(model, "sgd", lr=0.1), precision, zero_stage, micro_batch=8, world_size=world
    )
    g = torch.Generator().manual_seed(rank)
    losses = []
    for step in range(3):
        x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        result = engine.train_step(x1, x2, lr=0.1, momentum=0.9, step=step)
        losses.append(result.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # The precision policy: parameters, BN statistics and the queue stay fp32.
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the parameters"
    if precision == "fp16":  # the loss scaler survives a checkpoint round trip (DeepSpeed does not save it)
        engine.save_checkpoint(f"{out}.ckpt", "t", {})
        scaler = engine._grad_scaler()
        expected = scaler.state_dict()
        assert expected["scale"] != 2.0**16 or expected["_growth_tracker"] > 0  # it moved during training
        scaler.update(new_scale=3.0)
        engine.load_checkpoint(f"{out}.ckpt", "t", saved_world_size=world)
        assert scaler.state_dict() == expected
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": losses}, out)


RUNS = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("bf16", 2), ("fp16", 0)]


def _train_all(rank: int, world: int, out_dir: str) -> None:
    for precision, stage in RUNS:
        _train(rank, world, precision, stage, f"{out_dir}/{precision}-zero{stage}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    out_dir = tmp_path_factory.mktemp("engine")
    run_ranks(_train_all, 2, str(out_dir))  # one pair of processes for every run: start-up dominates
    return {(p, s): torch.load(out_dir / f"{p}-zero{s}.pt") for p, s in RUNS}


def test_zero_stages_agree(runs: dict) -> None:
    reference = runs["fp32", 0]["state"]
    for stage in (1, 2):
        for name, ref in reference.items():
            torch.testing.assert_close(runs["fp32", stage]["state"][name], ref, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(reference["encoder_q.backbone.conv1.weight"], reference["encoder_k.backbone.conv1.weight"])


@pytest.mark.parametrize("run", [("bf16", 2), ("fp16", 0)])
def test_low_precision_trains_with_batchnorm(runs: dict, run: tuple[str, int]) -> None:
    low, ref = runs[run], runs["fp32", run[1]]
    # Autocast changes the arithmetic, not the algorithm: the first loss agrees to low-precision accuracy.
    assert abs(low["losses"][0] - ref["losses"][0]) < 0.05 * abs(ref["losses"][0])
    assert low["losses"] != ref["losses"]  # it really ran in another precision


def _one_step_against_plain_sgd(rank: int, world: int, grad_clip: float) -> None:
    torch.manual_seed(0)
    model = MoCo(build_resnet("resnet18"), version="v2", dim=16, queue_size=64, bn_groups=2, cuda_graph_ema=False)
    reference = copy.deepcopy(model)
    engine = DeepSpeedEngine(model, build_optimizer(model, "sgd", lr=0.1), "fp32", 0, 8, 1, grad_clip=grad_clip)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    engine.train_step(x1, x2, lr=0.1, momentum=0.9, step=0)
    optimizer = build_optimizer(reference, "sgd", lr=0.1)  # the same SGD, outside DeepSpeed
    loss = reference(x1, x2, momentum=0.9, step=0).loss
    loss.backward()
    grads = [p.grad for p in reference.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 2  # large enough that DeepSpeed's default clipping at 1.0 would have changed the step
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
    optimizer.step()
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_step_is_a_plain_sgd_step(grad_clip: float) -> None:
    """No hidden gradient clipping (DeepSpeed clips at 1.0 unless told otherwise); clipping when asked."""
    run_ranks(_one_step_against_plain_sgd, 1, grad_clip)
