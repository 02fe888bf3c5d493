"""Initialisation by name: a model built on the meta device and initialised (whole, or on its FSDP2 shards on
2 gloo ranks) starts from the same values as one built whole; every tensor has a rule."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_ranks
from torch import nn
from torch.distributed.tensor import DTensor

from moco_scale.config import MocoConfig, ModelConfig
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_backbone
from moco_scale.models.init import initialise
from moco_scale.optim import build_optimizer

SETUPS = {
    "resnet18": (ModelConfig("resnet18"), MocoConfig(dim=16, queue_size=64)),
    "vit_tiny": (ModelConfig("vit_tiny", patch_size=8), MocoConfig("v3", dim=16, mlp_dim=32, shuffle_bn="sync")),
}


def _moco(name: str, world: int = 1) -> MoCo:
    model_cfg, moco_cfg = SETUPS[name]
    return MoCo(build_backbone(model_cfg, 32), moco_cfg, world_size=world, cuda_graph_ema=False)


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_meta_build_initialised_equals_a_whole_build(name: str) -> None:
    whole = _moco(name)
    whole.initialise(seed=7)
    with torch.device("meta"):
        meta = _moco(name)
    assert all(t.is_meta for t in meta.state_dict().values())  # nothing was allocated
    meta.to_empty(device="cpu")
    meta.initialise(seed=7)
    for (key, expected), got in zip(whole.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(got, expected), key
    other = _moco(name)
    other.initialise(seed=8)
    block_q, block_other = whole.encoder_q.backbone.blocks()[0], other.encoder_q.backbone.blocks()[0]
    assert not any(
        torch.equal(a, b) for a, b in zip(block_q.parameters(), block_other.parameters(), strict=True) if a.ndim > 1
    )
    for q, k in zip(whole.encoder_q.parameters(), whole.encoder_k.parameters(), strict=True):
        assert torch.equal(q, k)  # the key encoder starts as the query encoder


def test_a_module_without_a_rule_is_an_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="no initialisation rule for odd.*Odd"):
        initialise(nn.Sequential(), 0, [])  # nothing to draw: fine
        initialise(Odd(), 0, [], prefix="odd")


def _sharded_build_matches(rank: int, world: int, name: str) -> None:
    whole = _moco(name, world)
    whole.initialise(seed=3)
    expected = {k: v.clone() for k, v in whole.state_dict().items()}
    with torch.device("meta"):
        meta = _moco(name, world)

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, "sgd", lr=0.1)

    FSDPEngine(meta, make_optimizer, "fp32", materialise=(torch.device("cpu"), 3))
    first = next(p for p in meta.encoder_q.backbone.parameters() if p.shape[0] >= world)
    assert isinstance(first, DTensor) and first.to_local().shape[0] == -(-first.shape[0] // world)  # a shard
    for key, value in meta.state_dict().items():
        got = value.full_tensor() if isinstance(value, DTensor) else value
        assert torch.equal(got, expected[key]), key


@pytest.mark.parametrize("name", list(SETUPS))
def test_fsdp_draws_each_shard_to_the_whole_builds_values(name: str) -> None:
    run_ranks(_sharded_build_matches, 2, name)


def _zero3_build_matches(rank: int, world: int, name: str) -> None:
    import deepspeed

    from moco_scale.engine.deepspeed import build_partitioned, deepspeed_config

    whole = _moco(name, world)
    whole.initialise(seed=3)
    expected = {k: v.clone() for k, v in whole.state_dict().items()}
    model_cfg, moco_cfg = SETUPS[name]

    def build() -> MoCo:
        backbone, key_backbone = build_backbone(model_cfg, 32), build_backbone(model_cfg, 32)
        return MoCo(backbone, moco_cfg, world_size=world, cuda_graph_ema=False, key_backbone=key_backbone)

    model = build_partitioned(build, deepspeed_config("fp32", 3, 4, world), seed=3)
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned as built: no rank holds them whole
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("name", list(SETUPS))
def test_zero3_builds_partitioned_with_the_whole_builds_values(name: str) -> None:
    run_ranks(_zero3_build_matches, 2, name)


def _full_state(model: MoCo) -> dict[str, torch.Tensor]:
    """The whole module's values on every rank, from FSDP2's DTensors or ZeRO-3's partitions."""
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params) if params else torch.no_grad():
        state = model.state_dict()
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}


def _switch_builds_alike(rank: int, world: int, backend: str) -> None:
    from moco_scale.config import Config
    from moco_scale.distributed.comm import DistInfo
    from moco_scale.train import build_engine

    model_cfg, moco_cfg = SETUPS["vit_tiny"]
    cfg = Config(model=model_cfg, moco=moco_cfg)
    cfg.engine.backend, cfg.engine.zero_stage, cfg.engine.precision = (
        backend,
        3 if backend == "deepspeed" else 0,
        "fp32",
    )
    cfg.engine.cuda_graph_ema, cfg.train.seed = False, 5
    ctx = DistInfo(rank, world, rank, world, torch.device("cpu"))
    writers: list[str] = []  # how each build drew its values: on the shards (a writer) or whole (none)
    initialise = MoCo.initialise

    def spy(self: MoCo, seed: int, writer: object = None) -> None:
        writers.append(type(writer).__name__)
        initialise(self, seed, writer)

    MoCo.initialise = spy
    states = []
    for sharded in (True, False):
        cfg.engine.sharded_build = sharded
        model, _ = build_engine(cfg, ctx, peak_lr=0.1)
        states.append(_full_state(model))
    MoCo.initialise = initialise
    assert writers == [{"fsdp": "DTensorWriter", "deepspeed": "ZeroPartitionWriter"}[backend], "NoneType"]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_build_engine_starts_from_the_same_values_built_sharded_or_whole(backend: str) -> None:
    """``engine.sharded_build=false`` (the whole model on every rank, then sharded) is the same start."""
    run_ranks(_switch_builds_alike, 2, backend)
