"""The stage timer: what it records of a real MoCo step, that stages add up, and that off means off."""

from __future__ import annotations

import time

import torch
from dist_utils import run_ranks

from moco_scale.config import MocoConfig
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.observe import profiling
from moco_scale.optim import build_optimizer

MOCO_STAGES = {"query_fwd_bwd", "key_fwd", "ema", "queue_loss"}


def _moco(version: str = "v2", world: int = 1) -> MoCo:
    torch.manual_seed(0)
    shuffle_bn = "shuffle" if version != "v3" else "none"
    backbone = build_resnet("resnet18")
    model = MoCo(
        backbone, MocoConfig(version, dim=16, queue_size=64, shuffle_bn=shuffle_bn, bn_groups=2), world_size=world
    )
    return model.train()


def test_nested_stages_count_once_and_add_up_to_the_step() -> None:
    timer = profiling.StageTimer()
    with timer:
        with timer.step():
            with profiling.stage("outer"):
                time.sleep(0.02)
                with profiling.stage("inner"):
                    time.sleep(0.03)
            with profiling.stage("inner"):  # a stage met twice in a step adds up
                time.sleep(0.01)
        with profiling.stage("outside"):  # outside a step: not recorded
            pass
    (record,) = timer.steps
    assert set(record) == {"outer", "inner", "other", "step"}
    assert record["outer"] >= 20 and record["inner"] >= 40
    # Exclusive times: "outer" does not also count the 30 ms of "inner" inside it.
    assert record["outer"] + record["inner"] <= record["step"]
    assert record["other"] >= 0 and abs(sum(v for k, v in record.items() if k != "step") - record["step"]) < 1e-6
    assert profiling._active is None


def test_pop_means_averages_and_clears() -> None:
    timer = profiling.StageTimer()
    timer.steps = [{"ema": 1.0, "step": 4.0, "other": 3.0}, {"ema": 3.0, "key_fwd": 2.0, "step": 8.0, "other": 3.0}]
    assert timer.pop_means() == {"key_fwd": 1.0, "ema": 2.0, "other": 3.0, "step": 6.0}
    assert timer.steps == [] and timer.pop_means() == {}


def test_markers_are_free_null_contexts_when_no_timer_is_active() -> None:
    off = profiling.StageTimer(enabled=False)
    with off, off.step():
        assert profiling._active is None
        assert profiling.stage("ema") is profiling.stage("key_fwd")  # one shared null context
        model = _moco()
        x = torch.randn(4, 3, 32, 32)
        model.momentum_update(0.9)
        model(x, x, step=0).loss.backward()
    assert off.steps == [] and off.pop_means() == {}


def _v3_step_is_broken_down(rank: int, world: int) -> None:
    model, engine = _engine(world, "v3")
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    timer = profiling.StageTimer()
    with timer, timer.step():
        engine.train_step(x1, x2, lr=0.1, momentum=0.9, step=0)
    (record,) = timer.steps
    assert set(record) >= MOCO_STAGES
    assert all(record[name] > 0 for name in MOCO_STAGES)
    assert not {"encode_keys", "contrast"} & set(vars(model))  # the timed methods are the class's again


def test_single_process_v3_engine_step_is_broken_down() -> None:
    """The stages are marked by the engine, around the algorithm's methods, not inside them."""
    run_ranks(_v3_step_is_broken_down, 1)


def _engine(world: int, version: str = "v2") -> tuple[MoCo, DeepSpeedEngine]:
    model = _moco(version, world)
    return model, DeepSpeedEngine(
        model, lambda m: build_optimizer(m, "sgd", lr=0.1), "fp32", 0, micro_batch=4, world_size=world
    )


def _profiled_engine_steps(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)) for _ in range(2)]
    profiled_model, profiled = _engine(world)
    plain_model, plain = _engine(world)
    timer = profiling.StageTimer()
    walls = []
    with timer:
        for step, (x1, x2) in enumerate(batches):
            start = time.perf_counter()
            with timer.step():
                with profiling.stage("data_wait"):
                    x1, x2 = x1.clone(), x2.clone()
                profiled.train_step(x1, x2, lr=0.1, momentum=0.9, step=step)
            walls.append((time.perf_counter() - start) * 1e3)
    for step, (x1, x2) in enumerate(batches):
        plain.train_step(x1, x2, lr=0.1, momentum=0.9, step=step)

    assert len(timer.steps) == 2
    for record, wall in zip(timer.steps, walls, strict=True):
        assert set(profiling.STAGES) <= set(record), record  # every stage of the step, comm included
        assert all(record[name] > 0 for name in profiling.STAGES)
        stages = sum(record[name] for name in profiling.STAGES)
        assert stages <= record["step"] <= wall
    # Timing changed nothing: same parameters as the unprofiled twin, identical on every rank
    # (so the timed all-reduce still ran), and DeepSpeed's method is its own again.
    for p, q in zip(profiled_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)
    flat = torch.cat([p.detach().flatten() for p in profiled_model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    assert "allreduce_gradients" not in vars(profiled.engine)


def test_timer_records_every_stage_of_a_two_rank_engine_step() -> None:
    run_ranks(_profiled_engine_steps, 2)
