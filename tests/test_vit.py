"""Vision Transformers: torchvision's layout and numbers, the sin-cos position embedding and moco-v3's
initialisation against plain references, activation checkpointing (gradients and BN statistics equal) on
both backbone families, the config's checks, weight decay's exemptions."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from dist_utils import run_ranks
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from moco_scale.config import ConfigError, ModelConfig, load_config
from moco_scale.models import VIT_SPECS, build_backbone
from moco_scale.models.vit import sincos_position_embedding
from moco_scale.optim import parameter_groups


def _vit(arch: str = "vit_tiny", size: int = 32, patch: int = 8, **changes: object) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(arch, patch_size=patch, **changes), size)


def test_a_vit_loads_into_torchvision_strictly_and_computes_the_same_feature() -> None:
    ours = _vit(patch=4).eval()
    width, blocks, heads = VIT_SPECS["vit_tiny"]
    theirs = TorchvisionViT(32, 4, blocks, heads, width, 4 * width).eval()
    theirs.heads = nn.Identity()  # the class token's feature, as our backbone returns it
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours(x).shape == (3, ours.feature_dim) == (3, 192)


def test_the_position_embedding_is_the_2d_sincos_table() -> None:
    grid, width = 3, 8
    table = sincos_position_embedding(grid, width)[0]
    assert table.shape == (1 + grid * grid, width) and not table[0].any()  # the class token's row is zeros
    for row in range(grid):
        for col in range(grid):
            expected = []
            for angle_of in (col, row):
                angles = [angle_of / 10000 ** (i / (width // 4)) for i in range(width // 4)]
                expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            torch.testing.assert_close(table[1 + row * grid + col], torch.tensor(expected), rtol=0, atol=1e-6)
    assert not any(name.endswith("pos_embedding") for name, _ in _vit().named_parameters())  # fixed: a buffer


def test_moco_v3_initialisation_and_frozen_patch_projection() -> None:
    vit = _vit("vit_small", size=32, patch=16)
    width = 384
    qkv = vit.encoder.layers[0].self_attention.in_proj_weight
    assert qkv.shape == (3 * width, width)
    bound = math.sqrt(6 / (2 * width))  # one width x width matrix's Xavier bound, not the fused 3w x w one
    assert bound * 0.98 < qkv.abs().max() <= bound
    patch_bound = math.sqrt(6 / (3 * 16 * 16 + width))
    assert patch_bound * 0.98 < vit.conv_proj.weight.abs().max() <= patch_bound and not vit.conv_proj.bias.any()
    assert 0 < vit.class_token.std() < 1e-5
    mlp = vit.encoder.layers[3].mlp[0]
    assert mlp.weight.abs().max() <= math.sqrt(6 / (width + 4 * width)) and not mlp.bias.any()
    assert not any(p.requires_grad for p in vit.conv_proj.parameters())
    assert all(p.requires_grad for p in _vit("vit_small", patch=16, freeze_patch_embed=False).parameters())


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_activation_checkpointing_gives_the_same_gradients_and_statistics(arch: str) -> None:
    size = 32
    plain = _vit(arch, size) if arch.startswith("vit") else build_backbone(ModelConfig(arch), size)
    checkpointed = copy.deepcopy(plain)
    for block in checkpointed.blocks():
        block.activation_checkpointing = True
    recomputed = []
    for block in checkpointed.blocks():
        block.register_forward_hook(lambda *args: recomputed.append(1))
    x = torch.randn(4, 3, size, size)
    for model in (plain, checkpointed):
        model.train()
        model(x).square().sum().backward()
    assert len(recomputed) == len(checkpointed.blocks())  # hooks fire on __call__: the recompute is inside
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(b, c), name  # BN's running statistics moved once, not again in the recompute


def _saved_bytes(forward: Callable[[], object]) -> int:
    """What autograd keeps for the backward pass while ``forward`` runs, counted by saved-tensor hooks."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def test_checkpointing_saves_activation_memory() -> None:
    x = torch.randn(8, 3, 32, 32)
    plain = _vit(patch=4)
    checkpointed = _vit(patch=4, activation_checkpointing=True)
    assert _saved_bytes(lambda: checkpointed(x)) < 0.5 * _saved_bytes(lambda: plain(x))


def _saved_bytes_per_backend(rank: int, world: int) -> None:
    from moco_scale.config import Config, MocoConfig
    from moco_scale.distributed.comm import DistInfo
    from moco_scale.train import build_engine

    ctx = DistInfo(rank, world, rank, world, torch.device("cpu"))
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    for backend in ("fsdp", "deepspeed"):
        saved = {}
        for checkpointing in (False, True):
            cfg = Config(model=ModelConfig("vit_tiny", patch_size=8, activation_checkpointing=checkpointing))
            cfg.moco = MocoConfig("v3", dim=16, mlp_dim=32, shuffle_bn="sync")
            cfg.engine.backend, cfg.engine.precision, cfg.engine.cuda_graph_ema = backend, "fp32", False
            cfg.data.image_size, cfg.train.batch_size = 32, 4
            _, engine = build_engine(cfg, ctx, peak_lr=0.1)
            saved[checkpointing] = _saved_bytes(lambda engine=engine: engine._forward(*views, step=0))
        assert saved[True] < 0.25 * saved[False], (backend, saved)


def test_checkpointing_saves_activation_memory_under_fsdp2_and_deepspeed() -> None:
    """What the engine's forward keeps for the backward pass, with the blocks sharded (FSDP2) or not."""
    run_ranks(_saved_bytes_per_backend, 2)


def test_vit_config_checks() -> None:
    cfg = load_config(None, {"model.arch": "vit_base", "data.image_size": 224})
    assert cfg.model.patch_size == 16 and cfg.model.freeze_patch_embed
    for overrides, message in [
        ({"model.arch": "vit_base", "data.image_size": 100}, "data.image_size=100 must be a multiple of"),
        ({"model.arch": "vit_base", "model.width": 2}, "model.width and model.small_stem are for ResNets"),
        ({"model.arch": "vit_giant"}, "unknown arch 'vit_giant'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, {"data.image_size": 224, **overrides})


def test_adamw_exempts_biases_norms_and_the_class_token_from_weight_decay() -> None:
    vit = _vit()
    decay, exempt = parameter_groups(vit, 0.1, exclude_1d=True)
    assert exempt["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): name for name, p in vit.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert "class_token" in exempt_names and "encoder.ln.weight" in exempt_names
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_bias" in exempt_names
    assert {names[id(p)] for p in decay["params"]} == {
        name for name, p in vit.named_parameters() if p.ndim >= 2 and name != "class_token" and p.requires_grad
    }
    assert not any("conv_proj" in names[id(p)] for group in (decay, exempt) for p in group["params"])  # frozen
