"""The engines: a step is a plain SGD step; on 2 gloo ranks DeepSpeed ZeRO 0-3 and FSDP2 agree (the sharded
key-encoder EMA included), and every precision keeps BatchNorm working."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from dist_utils import run_ranks
from torch.distributed.tensor import DTensor

from moco_scale.config import MocoConfig, ModelConfig
from moco_scale.engine.deepspeed import DeepSpeedEngine
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.moco import MoCo
from moco_scale.models import build_backbone, build_resnet
from moco_scale.optim import build_optimizer


def _whole_state(model: MoCo, backend: str) -> dict[str, torch.Tensor]:
    """Every tensor of the module, gathered whole from the shards under ZeRO-3 and FSDP."""
    if backend == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.clone() for k, v in model.state_dict().items()}
    return {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in model.state_dict().items()}


def _train(rank: int, world: int, precision: str, backend: str, variant: str, out: str) -> None:
    """``variant`` "clip+copy": gradients clipped to norm 1 and the query's BN statistics copied to the key
    encoder by the momentum update; "vit": MoCo v3 on a ViT with activation checkpointing and sync-BN heads."""
    torch.manual_seed(0)
    if variant == "vit":
        cfg = MocoConfig("v3", dim=16, mlp_dim=32, shuffle_bn="sync")
        model_cfg = ModelConfig("vit_tiny", patch_size=8, activation_checkpointing=True)
    else:
        cfg = MocoConfig(dim=16, queue_size=64, key_bn_buffers="copy" if variant else "own")
        model_cfg = ModelConfig("resnet18")
    model = MoCo(build_backbone(model_cfg, 32), cfg, world_size=world, cuda_graph_ema=False).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grad_clip = 1.0 if variant == "clip+copy" else 0.0

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, "sgd", lr=0.1)

    def backbone() -> torch.nn.Module:
        return build_backbone(model_cfg, 32)

    if backend == "fsdp":
        engine = FSDPEngine(model, make_optimizer, precision, grad_clip, backbone_factory=backbone)
    else:
        stage = int(backend.removeprefix("zero"))
        engine = DeepSpeedEngine(model, make_optimizer, precision, stage, 8, world, grad_clip, backbone)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for step in range(3):
        x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        result = engine.train_step(x1, x2, lr=0.1, momentum=0.9, step=step)
        losses.append(result.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    state = _whole_state(model, backend)
    # The precision policy: parameters, BN statistics and the queue stay fp32.
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    flat = torch.cat([v.flatten().float() for k, v in state.items() if "encoder" in k and "running" not in k])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the parameters"
    backbone_copy = engine.query_backbone().eval()  # what the kNN monitor evaluates
    with torch.no_grad():
        features = backbone_copy(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    if precision == "fp16":  # the loss scaler survives a checkpoint round trip (DeepSpeed does not save it)
        engine.save_checkpoint(f"{out}.ckpt", "t")
        scaler = engine._grad_scaler()
        expected = scaler.state_dict()
        assert expected["scale"] != 2.0**16 or expected["_growth_tracker"] > 0  # it moved during training
        scaler.update(new_scale=3.0)
        engine.load_checkpoint(f"{out}.ckpt", "t", saved_world_size=world)
        assert scaler.state_dict() == expected
    if rank == 0:
        torch.save({"state": state, "losses": losses, "features": features, "initial": initial}, out)


RUNS = [
    ("fp32", "zero0", ""),
    ("fp32", "zero1", ""),
    ("fp32", "zero2", ""),
    ("fp32", "zero3", ""),
    ("fp32", "fsdp", ""),
    ("fp32", "zero0", "clip+copy"),
    ("fp32", "zero1", "clip+copy"),
    ("fp32", "zero3", "clip+copy"),
    ("fp32", "fsdp", "clip+copy"),
    ("fp32", "zero0", "vit"),
    ("fp32", "zero3", "vit"),
    ("fp32", "fsdp", "vit"),
    ("bf16", "zero2", ""),
    ("bf16", "fsdp", ""),
    ("fp16", "zero0", ""),
]


def _train_all(rank: int, world: int, out_dir: str) -> None:
    for precision, backend, variant in RUNS:
        _train(rank, world, precision, backend, variant, f"{out_dir}/{precision}-{backend}-{variant}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], dict]:
    out_dir = tmp_path_factory.mktemp("engine")
    run_ranks(_train_all, 2, str(out_dir))  # one pair of processes for every run: start-up dominates
    return {(p, b, v): torch.load(out_dir / f"{p}-{b}-{v}.pt") for p, b, v in RUNS}


AGREEING = [("zero1", ""), ("zero2", ""), ("zero3", ""), ("fsdp", "")]
AGREEING += [("zero1", "clip+copy"), ("zero3", "clip+copy"), ("fsdp", "clip+copy"), ("zero3", "vit"), ("fsdp", "vit")]


@pytest.mark.parametrize(("backend", "variant"), AGREEING)
def test_backends_agree(runs: dict, backend: str, variant: str) -> None:
    """After 3 steps every backend holds the same module as ZeRO-0 (unsharded; gradients averaged by our
    overlapped buckets): query side, queue, and the key encoder, whose momentum update ran on the local
    shards under ZeRO-3 and FSDP, with gradient clipping and copied BN statistics too."""
    reference, ours = runs["fp32", "zero0", variant], runs["fp32", backend, variant]
    for name, ref in reference["state"].items():
        torch.testing.assert_close(ours["state"][name], ref, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(ours["features"], reference["features"], rtol=1e-4, atol=1e-5)
    state = ours["state"]
    first = "backbone.encoder.layers.encoder_layer_0.mlp.0.weight" if variant == "vit" else "backbone.conv1.weight"
    assert not torch.equal(state[f"encoder_q.{first}"], state[f"encoder_k.{first}"])


@pytest.mark.parametrize("backend", ["zero0", "zero3", "fsdp"])
def test_vit_trains_with_its_patch_projection_frozen(runs: dict, backend: str) -> None:
    """MoCo v3 on vit_tiny: finite losses, the blocks trained, and the random patch projection of both
    encoders bitwise as it was built (no gradient, no weight decay; the momentum update of equal tensors)."""
    run = runs["fp32", backend, "vit"]
    assert all(math.isfinite(loss) for loss in run["losses"])
    state, initial = run["state"], run["initial"]
    for encoder in ("encoder_q", "encoder_k"):
        for name in ("conv_proj.weight", "conv_proj.bias"):
            assert torch.equal(state[f"{encoder}.backbone.{name}"], initial[f"{encoder}.backbone.{name}"]), name
    block = "encoder_q.backbone.encoder.layers.encoder_layer_5.self_attention.in_proj_weight"
    assert not torch.equal(state[block], initial[block])


def test_clipping_changed_the_run(runs: dict) -> None:
    clipped, plain = runs["fp32", "zero0", "clip+copy"]["state"], runs["fp32", "zero0", ""]["state"]
    assert not torch.allclose(clipped["encoder_q.backbone.conv1.weight"], plain["encoder_q.backbone.conv1.weight"])


@pytest.mark.parametrize("run", [("bf16", "zero2", ""), ("bf16", "fsdp", ""), ("fp16", "zero0", "")])
def test_low_precision_trains_with_batchnorm(runs: dict, run: tuple[str, str, str]) -> None:
    low, ref = runs[run], runs["fp32", run[1], ""]
    # Autocast changes the arithmetic, not the algorithm: the first loss agrees to low-precision accuracy.
    assert abs(low["losses"][0] - ref["losses"][0]) < 0.05 * abs(ref["losses"][0])
    assert low["losses"] != ref["losses"]  # it really ran in another precision


def _one_step_against_plain_sgd(rank: int, world: int, grad_clip: float) -> None:
    torch.manual_seed(0)
    model = MoCo(build_resnet("resnet18"), MocoConfig(dim=16, queue_size=64, bn_groups=2), cuda_graph_ema=False)
    reference = copy.deepcopy(model)
    engine = DeepSpeedEngine(model, lambda m: build_optimizer(m, "sgd", lr=0.1), "fp32", 0, 8, 1, grad_clip=grad_clip)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    engine.train_step(x1, x2, lr=0.1, momentum=0.9, step=0)
    optimizer = build_optimizer(reference, "sgd", lr=0.1)  # the same SGD, outside DeepSpeed
    reference.momentum_update(0.9)
    loss = reference(x1, x2, step=0).loss
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


def test_each_backbone_family_lists_its_blocks_for_the_cut_plan() -> None:
    for arch, blocks, kind in (
        ("resnet18", 8, "BasicBlock"),
        ("resnet50", 16, "Bottleneck"),
        ("vit_tiny", 6, "EncoderBlock"),
    ):
        backbone = build_backbone(ModelConfig(arch), 32 if arch.startswith("vit") else 64)
        units = backbone.blocks()
        assert len(units) == blocks and all(type(u).__name__ == kind for u in units)
        assert len({id(p) for u in units for p in u.parameters()}) < len(list(backbone.parameters()))  # not all
