"""Export the pretrained query backbone from a checkpoint, or describe a checkpoint.

    python launchers/export.py runs/demo backbone.pt
    python launchers/export.py runs/demo/checkpoints/step_00000200 moco.pth.tar --layout fbmoco
    python launchers/export.py --inspect runs/demo

CKPT is a checkpoint folder (``.../checkpoints/step_X``), a run's ``checkpoints`` folder or a run
directory; for the latter two, the checkpoint their ``latest`` file names, as ``checkpoint.resume``
resolves them. Any backend's checkpoint is read (DeepSpeed ZeRO 0-3, FSDP2) on the CPU; no
process group is created. Bad input exits with code 2 and one line starting ``error:``. The rank files
are read with ``torch.load(weights_only=True)``: one holding anything but tensors and plain values is
refused, and nothing in it runs. The output is written to a temporary file beside ``OUT``, flushed and
renamed, so ``OUT`` is never a partial file.

``--layout torchvision`` (default) writes the query backbone (``encoder_q.backbone.*``, prefix
stripped) as a plain ``state_dict`` of contiguous tensors. It holds no ``fc.*``: the backbone's
``fc`` is an identity, so give the torchvision model one too and load strictly::

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)

(Only ``model.width=1`` with the standard stem has a torchvision counterpart; other backbones
load into ``moco_scale.models.build_resnet`` the same way.) A ViT loads into torchvision's
``VisionTransformer`` built with its sizes (vit_base: 12 layers, 12 heads, 768 wide, MLP 3072; see
``moco_scale/models/vit.py``), its ``heads`` an identity, strictly::

    model = torchvision.models.VisionTransformer(224, 16, 12, 12, 768, 3072)
    model.heads = torch.nn.Identity()
    model.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)

``--layout timm`` writes the backbone under timm's names: a ResNet's are torchvision's; a ViT's are
renamed (``conv_proj`` -> ``patch_embed.proj``, ``class_token`` -> ``cls_token``, ``encoder.pos_embedding``
-> ``pos_embed``, ``encoder.layers.encoder_layer_<i>`` -> ``blocks.<i>`` with ``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; ``encoder.ln`` -> ``norm``). It loads strictly into the
timm model of the same sizes with no classifier::

    model = timm.create_model("vit_base_patch16_224", num_classes=0)   # or "resnet50"
    model.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)

``--layout fbmoco`` writes fb/moco's checkpoint layout, ``{"state_dict": {"module.encoder_q.<name>":
tensor}, "arch": <arch>, "epoch": None, "step": <step>}``, with torchvision names for the backbone
and the projection head under ``module.encoder_q.fc.*`` as in fb/moco. Its ``main_lincls.py
--pretrained`` keeps the ``module.encoder_q.`` keys except ``fc``, strips the prefix and loads them
with ``strict=False``, only ``fc.weight`` and ``fc.bias`` missing. ``epoch`` is the number of
completed epochs (checkpoints count steps; the fractional epoch is in ``--inspect``).

``--layout detectron2`` (ResNets) writes the pickle detectron2's ``ResNet`` backbone loads as ``MODEL.WEIGHTS``:
``{"model": {name: numpy array}, "__author__": "moco_scale", "matching_heuristics": True}``, the stem under
``stem.conv1``, the stages ``layer1``-``layer4`` as ``res2``-``res5``, each BN ``bn<i>`` as ``conv<i>.norm`` and
``downsample.0``/``.1`` as ``shortcut``/``shortcut.norm`` (fb/moco's converter's renaming; BN batch counters
left out). Use it with detectron2's ImageNet-pretrained settings for torchvision-style weights (RGB input,
``MODEL.PIXEL_MEAN``/``PIXEL_STD`` of torchvision, ``MODEL.RESNETS.STRIDE_IN_1X1=False``).

Each export also writes a model card beside ``OUT`` (``OUT`` with the suffix ``.md``): the architecture, MoCo
version, step and epoch, the data and its sample count, the last logged loss and kNN top-1, the git commit
the run trained with, and the lines that load the file.

``--inspect`` prints the step, epoch, world size, model and MoCo settings, parameter counts, the queue
and the file sizes.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from moco_scale import checkpoint
from moco_scale.fileio import replacing
from moco_scale.models import VIT_SPECS
from moco_scale.weights import BACKBONE, HEAD, WeightsError, read_module, strip

TIMM_VIT_NAMES = (  # (our name pattern, timm's): the ViT's torchvision-style names -> timm's VisionTransformer
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
)


def timm_names(backbone: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The backbone under timm's names (a ResNet's are torchvision's, so unchanged)."""
    if arch not in VIT_SPECS:
        return backbone
    renamed = {}
    for name, tensor in backbone.items():
        for pattern, replacement in TIMM_VIT_NAMES:
            name, found = re.subn(pattern, replacement, name)
            if found:
                break
        else:
            raise WeightsError(f"{name!r} has no timm counterpart")
        renamed[name] = tensor
    return renamed


DETECTRON2_NAMES = (  # (torchvision ResNet name pattern, detectron2's), applied in turn
    (r"^(conv1|bn1)\.", r"stem.\1."),
    (r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
)


def detectron2_names(backbone: dict[str, torch.Tensor], arch: str) -> dict[str, Any]:
    """detectron2's ``ResNet`` weights file: the backbone renamed, as numpy arrays, matching heuristics on."""
    if arch in VIT_SPECS:
        raise WeightsError(f"--layout detectron2 is for ResNets; {arch} is a ViT (use torchvision or timm)")
    model = {}
    for name, tensor in backbone.items():
        if name.endswith("num_batches_tracked"):
            continue  # detectron2's frozen BN has no batch counter
        for pattern, replacement in DETECTRON2_NAMES:
            name = re.sub(pattern, replacement, name)
        model[name] = tensor.numpy()
    return {"model": model, "__author__": "moco_scale", "matching_heuristics": True}


LAYOUTS = ("torchvision", "timm", "fbmoco", "detectron2")


def loading_lines(layout: str, out: str, arch: str, model: dict[str, Any], image_size: int) -> str:
    """How the file ``out`` of ``layout`` loads, for the model card."""
    strict = f'model.load_state_dict(torch.load("{out}", weights_only=True), strict=True)'
    if layout == "fbmoco":
        return f"python main_lincls.py -a {arch} --pretrained {out} --lr 30.0 ... /path/to/imagenet  # fb/moco"
    if layout == "detectron2":
        return f"python tools/train_net.py --config-file <a detectron2 R50 config> MODEL.WEIGHTS {out}"
    if arch in VIT_SPECS:
        width, layers, heads = VIT_SPECS[arch]
        patch = model.get("patch_size", 16)
        if layout == "timm":
            build = (
                "model = timm.models.vision_transformer.VisionTransformer(img_size="
                f"{image_size}, patch_size={patch}, embed_dim={width}, depth={layers}, num_heads={heads}, "
                "num_classes=0)"
            )
        else:
            build = (
                f"model = torchvision.models.VisionTransformer({image_size}, {patch}, {layers}, {heads}, {width}, "
                f"{4 * width})\nmodel.heads = torch.nn.Identity()"
            )
    elif layout == "timm":
        build = f'model = timm.create_model("{arch}", num_classes=0)'
    else:
        build = f"model = torchvision.models.{arch}()\nmodel.fc = torch.nn.Identity()"
    return f"{build}\n{strict}"


def model_card(ckpt: Path, out: Path, layout: str, meta: dict[str, Any]) -> str:
    """A short markdown description of an exported backbone."""
    cfg = meta.get("config", {})
    model, moco, data, train = (cfg.get(k, {}) for k in ("model", "moco", "data", "train"))
    arch = model.get("arch", "unknown")
    last = meta.get("metrics", {})
    knn = f"{last['knn_top1']:.1f}% (step {last['knn_step']})" if "knn_top1" in last else "not measured"
    loss = f"{last['loss']:.4f} (step {last['loss_step']})" if "loss" in last else "not recorded"
    rows = [
        ("architecture", f"{arch} (width {model.get('width', 1)}, patch {model.get('patch_size')})"),
        (
            "MoCo",
            f"{moco.get('version')}, dim {moco.get('dim')}, K {moco.get('queue_size')}, T {moco.get('temperature')}",
        ),
        (
            "trained",
            f"{meta.get('step')} steps, {meta.get('epoch')} epochs, {meta.get('world_size')} ranks "
            f"x batch {train.get('batch_size')}",
        ),
        ("data", f"{data.get('path')} ({meta.get('num_samples', 'unknown')} samples), {data.get('image_size')} px"),
        ("last logged loss", loss),
        ("kNN top-1", knn),
        ("code", f"moco_scale {meta.get('git_commit', 'unknown')}"),
        ("checkpoint", str(ckpt)),
        ("layout", layout),
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    code = loading_lines(layout, out.name, arch, model, data.get("image_size", 224))
    intro = f"# {out.name}\n\nThe query backbone of a MoCo pretraining run.\n\n| | |\n|---|---|\n"
    return f"{intro}{table}\n\nLoad it:\n\n```\n{code}\n```\n"


def card_path(out: Path) -> Path:
    """Where the model card of ``out`` goes: beside it, its suffix ``.md``."""
    return out.with_suffix(".md") if out.suffix and out.suffix != ".md" else out.with_name(out.name + ".card.md")


def export(ckpt: Path, out: Path, layout: str) -> str:
    """Write the query backbone of ``ckpt`` to ``out``, and its model card beside it; returns a one-line summary."""
    meta, module = checkpoint.read_meta(ckpt), read_module(ckpt)
    model_cfg = meta.get("config", {}).get("model", {})
    arch = model_cfg.get("arch", "unknown")
    backbone = strip(module, BACKBONE)
    if layout == "detectron2":
        payload: Any = detectron2_names(backbone, arch)
    elif layout == "fbmoco":
        encoder = {**backbone, **{f"fc.{k}": v for k, v in strip(module, HEAD).items()}}
        payload = {
            "state_dict": {f"module.encoder_q.{k}": v for k, v in encoder.items()},
            "arch": arch,
            "epoch": int(meta.get("epoch") or 0),  # completed epochs, as fb/moco counts them
            "step": meta.get("step"),
        }
    elif layout == "timm":
        payload = timm_names(backbone, arch)
    else:
        payload = backbone
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as temp:  # flushed, then renamed over ``out``: never a partial file under its name
        if layout == "detectron2":
            temp.write_bytes(pickle.dumps(payload))
        else:
            torch.save(payload, temp)
    with replacing(card_path(out)) as temp:
        temp.write_text(model_card(ckpt, out, layout, meta))
    if model_cfg.get("width", 1) != 1 or model_cfg.get("small_stem", False):
        print(
            f"warning: model.width={model_cfg.get('width')}, small_stem={model_cfg.get('small_stem')}: "
            f"this backbone does not fit torchvision.models.{arch}(); use moco_scale.models.build_resnet",
            file=sys.stderr,
        )
    return (
        f"wrote {len(backbone)} backbone tensors of {arch} at step {meta.get('step')} to {out} ({layout}), "
        f"its model card to {card_path(out)}"
    )


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _numel(module: dict[str, torch.Tensor], prefix: str) -> int:
    """Parameters under ``prefix``: every tensor but the BN statistics (the queue is not under a prefix)."""
    return sum(v.numel() for k, v in module.items() if k.startswith(prefix) and not k.endswith(BUFFER_SUFFIXES))


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def describe(ckpt: Path) -> str:
    """A short table describing ``ckpt``."""
    meta, module = checkpoint.read_meta(ckpt), read_module(ckpt)
    cfg = meta.get("config", {})
    model, moco, engine = cfg.get("model", {}), cfg.get("moco", {}), cfg.get("engine", {})
    backend = engine.get("backend", "deepspeed")
    if backend == "deepspeed":
        backend += f", ZeRO-{engine.get('zero_stage')}"
    rank_files = sorted(ckpt.glob("rank_*.pt"))
    engine_files = [p for p in ckpt.iterdir() if p.is_file() and p not in rank_files]
    rows = [
        ("checkpoint", str(ckpt)),
        ("step", str(meta.get("step"))),
        ("epoch", f"{meta.get('epoch')} (samples consumed / samples in the data)"),
        ("world size", f"{meta.get('world_size')} ({backend})"),
        ("arch", f"{model.get('arch')} (width {model.get('width')}, small_stem {model.get('small_stem')})"),
        ("moco", f"{moco.get('version')}, dim {moco.get('dim')}, K {moco.get('queue_size')}"),
        ("precision", str(engine.get("precision"))),
        ("params q backbone", f"{_numel(module, BACKBONE):,}"),
        ("params q head", f"{_numel(module, HEAD):,}"),
    ]
    if any(k.startswith("predictor.") for k in module):
        rows.append(("params predictor", f"{_numel(module, 'predictor.'):,}"))
    rows.append(("params key encoder", f"{_numel(module, 'encoder_k.'):,}"))
    if "queue.keys" in module:
        keys = module["queue.keys"]
        sharded = " (rank 0's slice; moco.shard_queue)" if moco.get("shard_queue") else ""
        rows.append(("queue", f"{keys.shape[0]} keys x {keys.shape[1]}, ptr {int(module['queue.ptr'])}{sharded}"))
    else:
        rows.append(("queue", "none"))
    rows.append((f"engine files ({len(engine_files)})", _size(sum(p.stat().st_size for p in engine_files))))
    rows.append((f"rank_*.pt ({len(rank_files)})", _size(sum(p.stat().st_size for p in rank_files))))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint folder, a run's checkpoints folder, or a run directory")
    parser.add_argument("out", nargs="?", help="output file (not with --inspect)")
    parser.add_argument("--layout", choices=LAYOUTS, default="torchvision")
    parser.add_argument("--inspect", action="store_true", help="describe the checkpoint instead of exporting")
    args = parser.parse_args(argv)
    if args.inspect == (args.out is not None):
        parser.error("give OUT to export, or --inspect without OUT")
    try:
        ckpt = checkpoint.locate(args.ckpt)
        print(describe(ckpt) if args.inspect else export(ckpt, Path(args.out), args.layout))
    except (WeightsError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
