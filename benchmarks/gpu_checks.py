"""``gpu_suite.py``'s first phase, ``correctness``: the GPU paths give the right numbers, not only fast ones.

Each check returns ``{"status": "pass" | "fail" | "skip", "detail": one line with its figures, ...}`` and runs
on its own: an exception is that check's failure. On a machine without CUDA (``--device cpu``, CI's dry run)
every check runs with the CPU standing in for the GPU, so the code is exercised before the one real run.

- ``ema``: the momentum update as the engine runs it (``MoCo.momentum_update``: a CUDA graph on the GPU) equals,
  bitwise, a fresh eager update of a copy, over 20 steps of MoCo v3's cosine momentum, with the module moved
  (memory format) after step 7 and re-cast (fp64) after step 14, and the BN buffers averaged too.
- ``training_<recipe>``: 40 steps of ResNet-18 (MoCo v2 and v3) and ViT-tiny (MoCo v3) at the suite's
  precision, on views drawn from a fixed set of 512 random images: every loss finite, and for v3 the mean of
  the last 5 losses at least ``LEARNS_BY`` nats below the mean of the first 5 (v2: see ``RECIPES``).
- ``cpu_twin_<recipe>``: the same run in fp32 (TF32 off) on the device and on the CPU agrees for 3 steps.
- ``placement``: after two steps of the suite's engine, every parameter, buffer (the queue among them) and
  optimizer state is on the device and fp32, the 4-D weights are channels-last on CUDA, and the convolutions
  or patch projection compute in the precision's dtype.
- ``memory_format``: channels-last gives the same losses as contiguous over 3 steps, in fp32 and in bf16.
- ``split_bn``: ``SplitBatchNorm`` (single-process shuffle-BN) on the device equals its CPU result: output,
  running statistics and gradients.
- ``decode``: the torch loader's device path (``moco_scale.data.device_views``, for GPUs without DALI): a batch of
  JPEG photos decoded on the device against libjpeg-turbo on the CPU (mean gap <= ``DECODE_MEAN_GAP`` levels),
  and the two views it makes from them on the device against the same on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco_scale.config import MocoConfig, ModelConfig
from moco_scale.engine.base import COMPUTE_DTYPES, StepEngine
from moco_scale.engine.local import LocalEngine
from moco_scale.moco import MoCo
from moco_scale.moco.batchnorm import SplitBatchNorm
from moco_scale.moco.momentum import MomentumUpdater
from moco_scale.models import build_backbone
from moco_scale.optim import build_optimizer

Check = dict[str, Any]

IMAGES, IMAGE_SIZE, BATCH = 512, 32, 32  # the training checks' fixed image set and views
TRAINING_STEPS = 40
LEARNS_BY = 0.5  # nats: the mean of the last 5 losses below the mean of the first 5
TWIN_STEPS = 3
# fp32 on both sides with TF32 off, so only the order of sums differs (cuDNN's kernels against the CPU's);
# three SGD steps grow that to ~1e-5 relative on the CPU. A real placement or layout bug moves the loss by 1e-2+.
TWIN_RTOL = 2e-3
FORMAT_RTOL = {"fp32": 1e-3, "bf16": 3e-2}  # bf16 keeps 8 bits: reordered sums differ by ~2^-8 per op
SPLIT_BN_RTOL = 1e-5
DECODE_MEAN_GAP = 1.5  # 0-255 levels: nvJPEG's IDCT and upsampling round otherwise than libjpeg-turbo's
VIEW_MEAN_GAP = 0.03  # normalised units (~2 levels): the decode's gap, through the colour maps


@dataclass(frozen=True)
class Recipe:
    """One training check's model and optimizer; ``learns``: whether its loss must fall by ``LEARNS_BY``."""

    arch: str
    moco: MocoConfig
    optimizer: str
    lr: float
    learns: bool = True


RECIPES = {
    # MoCo v2 on random images needs hundreds of steps to leave chance: measured on the CPU, 60 steps stayed at
    # 5.3-5.4 against ln 257 = 5.55 (T 0.1-0.2, m 0.9-0.99, lr 0.005-0.3), 300 steps reached 5.0-5.3. Its queue
    # path is checked for finite losses that stay at or below chance once the queue holds only real keys.
    "resnet18_v2": Recipe("resnet18", MocoConfig(dim=128, queue_size=256, momentum=0.99), "sgd", 0.05, False),
    # in-batch negatives learn within 40 steps: measured 2.92 -> 1.69 (R18, m 0.9) and 2.61 -> 1.63 (ViT-tiny)
    "resnet18_v3": Recipe(
        "resnet18", MocoConfig("v3", dim=64, mlp_dim=256, momentum=0.9, shuffle_bn="none"), "sgd", 0.05
    ),
    "vit_tiny_v3": Recipe(
        "vit_tiny", MocoConfig("v3", dim=64, mlp_dim=256, momentum=0.99, shuffle_bn="none"), "adamw", 1e-3
    ),
}
TWINS = ("resnet18_v2", "vit_tiny_v3")  # the queue and shuffle-BN path, and the ViT


def run_checks(checks: dict[str, Callable[[], Check]]) -> dict[str, Check]:
    """Every check, each on its own: one that raises is a failure with the error as its detail."""
    results: dict[str, Check] = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # a failing check must not stop the others
            traceback.print_exc()
            results[name] = {"status": "fail", "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        print(f"  {name}: {results[name]['status']}  {results[name]['detail']}", flush=True)
    return results


def verdict(passed: bool, detail: str, **figures: Any) -> Check:
    return {"status": "pass" if passed else "fail", "detail": detail, **figures}


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions, so fp32 on the GPU is fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_moco(arch: str, cfg: MocoConfig, device: torch.device) -> MoCo:
    """ResNet-18 (shuffle-BN as ``SplitBatchNorm``) or ViT-tiny with 8 px patches at 32 px, seeded."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch, patch_size=8), IMAGE_SIZE)
    return MoCo(backbone, cfg, world_size=1).to(device).train()


# ---------------------------------------------------------------- ema


def perturb(module: nn.Module, generator: torch.Generator) -> None:
    """The optimizer moving the query encoder, and its forward moving the BN statistics, between two updates."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.add_(0.01 * noise.to(tensor.device, tensor.dtype))


def check_ema(device: torch.device, steps: int = 20) -> Check:
    """``MoCo.momentum_update`` against a fresh eager ``MomentumUpdater`` on copies, bitwise, step by step."""
    cfg = MocoConfig(dim=128, queue_size=1024, key_bn_buffers="ema")
    model = small_moco("resnet18", cfg, device)
    query, key = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    changes = {
        7: ("moved to channels-last", lambda module: module.to(memory_format=torch.channels_last)),
        14: ("re-cast to fp64", lambda module: module.double()),
    }
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    base = 0.99
    first_mismatch: int | None = None
    for step in range(steps):
        if step in changes:
            for module in (model, query, key):
                changes[step][1](module)
        momentum = 1 - (1 - base) * (math.cos(math.pi * step / steps) + 1) / 2  # MoCo v3's cosine, towards 1
        model.momentum_update(momentum)
        MomentumUpdater(query, key, "ema", cuda_graph=False)(momentum)
        perturb(model.encoder_q, g_ours)
        perturb(query, g_ref)
        ours, ref = model.encoder_k.state_dict(), key.state_dict()
        if first_mismatch is None and any(not torch.equal(ours[n], ref[n]) for n in ref):
            first_mismatch = step
    ours, ref = model.encoder_k.state_dict(), key.state_dict()
    differ = [n for n in ref if not torch.equal(ours[n], ref[n])]
    largest = max(((ours[n].double() - ref[n].double()).abs().max().item() for n in differ), default=0.0)
    graph = model._updater is not None and model._updater.use_graph
    path = "CUDA graph" if graph else "eager (no CUDA)"
    detail = f"{path} vs eager, {steps} steps, moved at 7, re-cast at 14: " + (
        "bitwise equal" if not differ else f"{len(differ)} tensors differ from step {first_mismatch}, by {largest:.3g}"
    )
    return verdict(not differ, detail, tensors_differing=len(differ), first_mismatch=first_mismatch, cuda_graph=graph)


# ---------------------------------------------------------------- training


class FixedImages:
    """``IMAGES`` random images (smooth: 8x8 noise upsampled to 40 px), and two views of a batch of them: a random
    32 px crop each and a random horizontal flip, drawn on the CPU from a seeded generator so that every device
    sees the same views."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        coarse = torch.randn(IMAGES, 3, 8, 8, generator=self.generator)
        self.images = F.interpolate(coarse, size=IMAGE_SIZE + 8, mode="bilinear", align_corners=False)

    def view(self, indices: torch.Tensor) -> torch.Tensor:
        offsets = torch.randint(0, 9, (len(indices), 2), generator=self.generator).tolist()
        flips = torch.rand(len(indices), generator=self.generator) < 0.5
        crops = [
            self.images[i, :, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]
            for i, (y, x) in zip(indices.tolist(), offsets, strict=True)
        ]
        return torch.where(flips[:, None, None, None], torch.stack(crops).flip(3), torch.stack(crops))

    def batches(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            indices = torch.randint(0, IMAGES, (BATCH,), generator=self.generator)
            yield self.view(indices), self.view(indices)


def train_losses(
    recipe: Recipe, device: torch.device, precision: str, steps: int, channels_last: bool = False
) -> list[float]:
    """The losses of a short run of ``LocalEngine`` (the house step) on ``FixedImages``."""
    model = small_moco(recipe.arch, recipe.moco, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr, weight_decay=1e-4, device_type=device.type)
    engine = LocalEngine(model, optimizer, precision)
    losses = []
    for step, (view1, view2) in enumerate(FixedImages().batches(steps)):
        views = [v.to(device).contiguous(memory_format=memory_format) for v in (view1, view2)]
        result = engine.train_step(*views, lr=recipe.lr, momentum=recipe.moco.momentum, step=step)
        losses.append(result.loss.item())
    return losses


def check_training(name: str, device: torch.device, precision: str) -> Check:
    recipe = RECIPES[name]
    losses = train_losses(recipe, device, precision, TRAINING_STEPS, channels_last=device.type == "cuda")
    finite = all(math.isfinite(x) for x in losses)
    summary = f"{precision}, {TRAINING_STEPS} steps"
    if recipe.learns:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        passed = finite and first - last >= LEARNS_BY
        summary += f": loss {first:.3f} -> {last:.3f} (must fall >= {LEARNS_BY})"
    else:  # after the queue's first K / batch steps, no loss above chance
        chance, filled = math.log(recipe.moco.queue_size + 1), recipe.moco.queue_size // BATCH
        highest = max(losses[filled:])
        passed = finite and highest <= chance + 0.05
        summary += f": highest loss once the queue is full {highest:.3f} (chance ln(K+1) = {chance:.3f})"
    return verdict(passed, summary + ("" if finite else ", not finite"), losses=losses)


def relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def check_cpu_twin(name: str, device: torch.device) -> Check:
    """fp32 on ``device`` against fp32 on the CPU, step by step."""
    with exact_fp32():
        ours = train_losses(RECIPES[name], device, "fp32", TWIN_STEPS)
        cpu = train_losses(RECIPES[name], torch.device("cpu"), "fp32", TWIN_STEPS)
    gap = relative_gap(ours, cpu)
    detail = f"fp32 {device.type} vs cpu, {TWIN_STEPS} steps: largest relative loss gap {gap:.2e} (<= {TWIN_RTOL})"
    return verdict(gap <= TWIN_RTOL, detail, losses=ours, cpu_losses=cpu, gap=gap)


def check_memory_format(device: torch.device) -> Check:
    gaps = {}
    with exact_fp32():
        for precision in FORMAT_RTOL:
            contiguous = train_losses(RECIPES["resnet18_v2"], device, precision, TWIN_STEPS)
            channels_last = train_losses(RECIPES["resnet18_v2"], device, precision, TWIN_STEPS, channels_last=True)
            gaps[precision] = relative_gap(channels_last, contiguous)
    passed = all(gaps[p] <= FORMAT_RTOL[p] for p in gaps)
    detail = ", ".join(f"{p} gap {gaps[p]:.2e} (<= {FORMAT_RTOL[p]})" for p in gaps)
    return verdict(passed, f"channels-last vs contiguous, {TWIN_STEPS} steps: {detail}", gaps=gaps)


# ---------------------------------------------------------------- placement


def check_placement(engine: StepEngine, precision: str, device: torch.device, views: list[torch.Tensor]) -> Check:
    """Two steps of the suite's engine, then where every tensor lives and in which dtype the compute runs."""
    model = engine.model
    first = next(m for m in model.encoder_q.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    seen: list[torch.dtype] = []
    hook = first.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        for step in range(2):
            engine.train_step(*views, lr=1e-4, momentum=0.99, step=step)
    finally:
        hook.remove()
    wrong: list[str] = []

    def expect(name: str, tensor: torch.Tensor, layout: bool = False) -> None:
        if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
            wrong.append(f"{name} on {tensor.device}")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            wrong.append(f"{name} is {tensor.dtype}")
        if layout and tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
            wrong.append(f"{name} not channels-last")

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        expect(name, tensor, layout=device.type == "cuda")
    optimizer = getattr(engine, "base_optimizer", engine.optimizer)
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim():  # 0-d counters ("step") may stay on the CPU
                expect(f"optimizer state {i}.{key}", value)
    compute = COMPUTE_DTYPES[precision]
    if seen != [compute] * len(seen) or not seen:
        wrong.append(f"first layer computed in {sorted(set(map(str, seen)))}, not {compute}")
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    detail = f"{tensors} module tensors + optimizer state on {device}, fp32; compute {precision}: " + (
        "as expected" if not wrong else f"{len(wrong)} wrong, first: {wrong[0]}"
    )
    return verdict(not wrong, detail, wrong=wrong[:20])


# ---------------------------------------------------------------- split_bn


def check_split_bn(device: torch.device) -> Check:
    """``SplitBatchNorm`` (8 groups) on the device against the CPU: output, running statistics, gradients."""
    torch.manual_seed(0)
    cpu_bn = SplitBatchNorm(16, 8)
    with torch.no_grad():
        cpu_bn.weight.uniform_(0.5, 1.5)
        cpu_bn.bias.uniform_(-0.5, 0.5)
    device_bn = copy.deepcopy(cpu_bn).to(device)
    x = torch.randn(64, 16, 8, 8) * 3 + 1
    results = []
    for bn, data in ((cpu_bn, x), (device_bn, x.to(device))):
        data = data.clone().requires_grad_(True)
        out = bn(data)
        (out * torch.arange(out.numel(), device=out.device).reshape(out.shape).sin()).sum().backward()
        results.append([out, bn.running_mean, bn.running_var, data.grad, bn.weight.grad, bn.bias.grad])
    names = ["output", "running_mean", "running_var", "input grad", "weight grad", "bias grad"]
    gaps = {
        n: ((a.cpu().double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()
        for n, b, a in zip(names, results[0], results[1], strict=True)
    }
    worst = max(gaps, key=gaps.get)
    detail = f"{device.type} vs cpu: largest relative error {gaps[worst]:.2e} ({worst}; <= {SPLIT_BN_RTOL})"
    return verdict(gaps[worst] <= SPLIT_BN_RTOL, detail, gaps=gaps)


def photo_jpegs(count: int, size: tuple[int, int] = (400, 300)) -> list[bytes]:
    """``count`` JPEGs (quality 90) of crops of scikit-learn's two sample photos, resized to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos, out = load_sample_images().images, []
    for i in range(count):
        photo = photos[i % 2]
        top, left = (i * 37) % 100, (i * 53) % 200
        buffer = io.BytesIO()
        Image.fromarray(photo[top : top + 320, left : left + 430]).resize(size).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def device_batch(jpegs: list[bytes], views: tuple, seed: int = 0) -> tuple:
    """A batch for ``DeviceViews``: the encoded JPEGs, and both views' crop boxes and parameters drawn per image."""
    from moco_scale.data.batch_augment import draw_views
    from moco_scale.data.device_views import jpeg_to_decode

    payloads, boxes, params = [], [], ([], [])
    for i, jpeg in enumerate(jpegs):
        torch.default_generator.manual_seed(seed * 100_003 + i)
        (box1, p1), (box2, p2) = draw_views(*jpeg_to_decode(jpeg)[1], views)
        payloads.append(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
        boxes.append([box1, box2])
        params[0].append(p1)
        params[1].append(p2)
    empty = [torch.empty(0, dtype=torch.uint8)] * len(jpegs)
    stacked = torch.stack(params[0]), torch.stack(params[1])
    return payloads, torch.tensor(boxes), empty, stacked[0], empty, stacked[1], torch.arange(len(jpegs))


def check_decode(device: torch.device) -> Check:
    """The device path's decode and views on the device against the CPU, on 32 JPEG photos."""
    from moco_scale.data.augment import moco_views
    from moco_scale.data.device_views import DeviceViews, decode_on

    batch = device_batch(photo_jpegs(32), moco_views("v2", 224))
    cpu_images = decode_on(batch[0], torch.device("cpu"))
    device_images = decode_on(batch[0], device)
    pairs = zip(cpu_images, device_images, strict=True)
    decode_gap = max((a.float() - b.cpu().float()).abs().mean().item() for a, b in pairs)
    views = [DeviceViews(moco_views("v2", 224), where)(batch) for where in (torch.device("cpu"), device)]
    view_gap = max((a - b.cpu()).abs().mean().item() for a, b in zip(views[0][:2], views[1][:2], strict=True))
    passed = decode_gap <= DECODE_MEAN_GAP and view_gap <= VIEW_MEAN_GAP
    detail = (
        f"{device.type} vs cpu: decode mean gap {decode_gap:.3f} levels (<= {DECODE_MEAN_GAP}), views mean gap "
        f"{view_gap:.4f} (<= {VIEW_MEAN_GAP}, normalised units)"
    )
    return verdict(passed, detail, decode_gap=decode_gap, view_gap=view_gap)


def correctness_phase(
    engine: StepEngine, precision: str, device: torch.device, views: list[torch.Tensor], general: bool
) -> dict[str, Check]:
    """The placement of the suite's engine, and with ``general`` the checks that build their own small models."""
    checks: dict[str, Callable[[], Check]] = {"placement": lambda: check_placement(engine, precision, device, views)}
    if general:
        checks["ema"] = lambda: check_ema(device)
        for name in RECIPES:
            checks[f"training_{name}"] = lambda name=name: check_training(name, device, precision)
        for name in TWINS:
            checks[f"cpu_twin_{name}"] = lambda name=name: check_cpu_twin(name, device)
        checks["memory_format"] = lambda: check_memory_format(device)
        checks["split_bn"] = lambda: check_split_bn(device)
        checks["decode"] = lambda: check_decode(device)
    return run_checks(checks)
