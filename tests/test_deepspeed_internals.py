"""Each DeepSpeed internal that moco_scale relies on (moco_scale/engine/deepspeed_internals.py), checked on
the installed DeepSpeed with real engines: an upgrade that moves or renames one fails here, by name."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from packaging.specifiers import SpecifierSet

from moco_scale.config import MocoConfig
from moco_scale.engine import deepspeed_internals as internals
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_resnet
from moco_scale.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_deepspeed_is_in_the_pinned_range() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = SpecifierSet(re.search(r'"deepspeed([^"]+)"', pyproject).group(1))
    assert pinned.contains(importlib.metadata.version("deepspeed")), pinned


def _engine(zero_stage: int, world: int, precision: str = "fp32") -> DeepSpeedEngine:
    torch.manual_seed(0)
    model = MoCo(build_resnet("resnet18"), MocoConfig(dim=16, queue_size=64), world_size=world, cuda_graph_ema=False)

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, "sgd", lr=0.1)

    return DeepSpeedEngine(model.train(), make_optimizer, precision, zero_stage, 4, world)


def _save_and_read_back(engine: DeepSpeedEngine, folder: Path, world: int) -> None:
    views = torch.randn(2, 4, 3, 32, 32)
    engine.train_step(views[0], views[1], lr=0.1, momentum=0.9, step=0)
    engine.engine.save_checkpoint(str(folder), tag="t", client_state={}, save_latest=False)
    torch.distributed.barrier()
    ckpt = folder / "t"
    assert (ckpt / internals.MODEL_FILE).is_file()
    shards = sorted(p.name for p in ckpt.glob(internals.ZERO_SHARD_GLOB))
    assert shards == [internals.zero_shard_file(r) for r in range(world)]
    assert all(re.fullmatch(internals.ZERO_SHARD_PATTERN, name) for name in shards)
    layout = engine.layout  # the files it names are those DeepSpeed wrote, each with its writer
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(f.name for f in layout.expected_files(ckpt, world))
    assert sorted(layout.writer(p.name) for p in ckpt.iterdir()) == sorted([0, *range(world)])
    layout.check(ckpt)
    whole = layout.read_module(ckpt)  # on the CPU, without the process group
    assert whole.keys() == engine.model.state_dict().keys()
    with torch.serialization.safe_globals(internals.zero_shard_globals()):  # only these types besides tensors
        torch.load(ckpt / internals.zero_shard_file(0), map_location="cpu", weights_only=True)
    _, client_state = engine.engine.load_checkpoint(str(folder), tag="t", load_module_only=True)
    assert set(internals.STEP_COUNTERS) <= client_state.keys()
    internals.restore_step_counters(engine.engine, client_state)


def _internals_hold(rank: int, world: int, folder: str) -> None:
    zero0 = _engine(0, world)
    assert zero0.engine.enable_backward_allreduce is False  # set through disable_backward_allreduce
    assert internals.autocast_grad_scaler(zero0.engine, zero0.optimizer) is None  # fp32
    fp16 = _engine(1, world, "fp16")
    assert isinstance(internals.autocast_grad_scaler(fp16.engine, fp16.optimizer), torch.amp.GradScaler)

    zero1 = _engine(1, world)
    process_group, base, masters = internals.zero_partitions(zero1.engine.optimizer)
    assert torch.distributed.get_world_size(process_group) == world and isinstance(base, torch.optim.SGD)
    assert all(m.dtype == torch.float32 and m.dim() == 1 for m in masters)
    total = sum(p.numel() for p in zero1.model.parameters() if p.requires_grad)
    assert sum(m.numel() for m in masters) * world >= total  # this rank's slice of the padded flat groups
    _save_and_read_back(zero1, Path(folder) / "zero1", world)
    assert all(base.state[m]["momentum_buffer"].shape == m.shape for m in masters)
    internals.refresh_parameter_state_views(zero1.engine.optimizer)

    zero3 = _engine(3, world)
    first = next(zero3.model.encoder_q.parameters())
    assert internals.local_shard(first).numel() * world >= first.ds_numel  # a partition, not the whole
    zero3.engine.save_checkpoint(str(Path(folder) / "zero3"), tag="t", client_state={}, save_latest=False)
    torch.distributed.barrier()
    ckpt = Path(folder) / "zero3" / "t"
    files = sorted(p.name for p in ckpt.iterdir())  # per rank: its parameter partitions and optimizer shard
    assert files == sorted(
        n for r in range(world) for n in (internals.zero3_model_file(r), internals.zero_shard_file(r))
    )
    assert files == sorted(f.name for f in zero3.layout.expected_files(ckpt, world))
    assert sorted(zero3.layout.writer(name) for name in files) == sorted([*range(world)] * 2)
    if rank == 0:
        whole = zero3.layout.read_module(ckpt)  # the partitions put together on the CPU
        assert whole["encoder_q.backbone.conv1.weight"].shape == (64, 3, 7, 7)
        assert whole.keys() >= {"encoder_k.backbone.conv1.weight", "queue.keys", "queue.ptr"}


@pytest.mark.slow
def test_every_deepspeed_internal_we_use_is_there(tmp_path: Path) -> None:
    run_ranks(_internals_hold, 2, str(tmp_path))


def test_the_shared_memory_all_reduce_switch_is_there() -> None:
    import deepspeed.ops

    internals.skip_cpu_shm_all_reduce()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
