"""A rank's end: no process group is left for interpreter finalization to destroy.

A group that outlives ``destroy_process_group`` (DeepSpeed and DTensor keep references to it) has its
native threads torn down during finalization, where a finished rank was seen to abort now and then
("terminate called without an active exception"). ``shutdown_distributed`` drops those references;
``leave_if_groups_linger`` ends a rank without finalization where a library still holds one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks

from moco_scale.config import MocoConfig
from moco_scale.distributed.comm import native_group_threads, shutdown_distributed
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer


def _train_one_step(backend: str, world: int) -> None:
    model = MoCo(
        build_resnet("resnet18"), MocoConfig(dim=16, queue_size=64), world_size=world, cuda_graph_ema=False
    ).train()

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, "sgd", lr=0.1)

    if backend == "fsdp":
        engine = FSDPEngine(model, make_optimizer, "fp32", 0.0, backbone_factory=lambda: build_resnet("resnet18"))
    else:
        engine = DeepSpeedEngine(model, make_optimizer, "fp32", 0, 8, world, 0.0, lambda: build_resnet("resnet18"))
    views = torch.randn(2, 8, 3, 32, 32)
    engine.train_step(views[0], views[1], lr=0.1, momentum=0.9, step=0)
    engine.query_backbone()  # the kNN monitor's gathered copy: DTensor redistribution under FSDP2


def _no_group_threads_after_shutdown(rank: int, world: int) -> None:
    groups_alive = len(native_group_threads())
    assert groups_alive > 0, "the test should see the default group's threads"
    for backend in ("deepspeed", "fsdp"):
        _train_one_step(backend, world)
    shutdown_distributed()
    assert native_group_threads() == [], "a process group outlived shutdown_distributed"


@pytest.mark.slow
def test_no_process_group_outlives_shutdown() -> None:
    """DeepSpeed (ZeRO-0, its groups module and a default argument) and FSDP2 (DTensor's plan caches) both
    hold the group after destroy_process_group; after shutdown_distributed no group thread is left."""
    run_ranks(_no_group_threads_after_shutdown, 2)


def test_a_rank_whose_group_lingers_leaves_without_finalization(tmp_path) -> None:
    """A group still held by someone at the end: the rank exits with the given code at once, its output
    flushed, and the atexit handlers of finalization never run."""
    script = textwrap.dedent(
        f"""
        import atexit, os, sys
        import torch.distributed as dist
        from moco_scale.distributed.comm import free_port, leave_if_groups_linger, shutdown_distributed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        held = dist.group.WORLD  # as a library would keep it
        dist.new_group([0])
        atexit.register(lambda: open({str(tmp_path / "finalized")!r}, "w").close())
        shutdown_distributed()
        print("flushed before leaving", end="")
        leave_if_groups_linger(5)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr[-2000:]
    assert done.stdout == "flushed before leaving"
    assert not (tmp_path / "finalized").exists()


def test_a_rank_with_no_group_left_finalizes_normally(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import atexit, os
        import torch, torch.distributed as dist
        from moco_scale.distributed.comm import free_port, leave_if_groups_linger, native_group_threads
        from moco_scale.distributed.comm import shutdown_distributed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        dist.all_reduce(torch.ones(1))
        atexit.register(lambda: open({str(tmp_path / "finalized")!r}, "w").close())
        shutdown_distributed()
        assert native_group_threads() == [], native_group_threads()
        leave_if_groups_linger(5)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "finalized").exists()
    assert not dist.is_initialized()
