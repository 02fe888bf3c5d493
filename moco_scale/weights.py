"""A pretrained query backbone's weights: read from a checkpoint, or from a file that launchers/export.py wrote.

Checkpoints are read on the CPU with no process group, whatever wrote them, by the checkpoint layout
of the backend that wrote them (``CheckpointLayout.read_module``: DeepSpeed's model file or ZeRO-3
partitions, an FSDP2 run's torch.distributed.checkpoint files).

Whatever moco_scale wrote itself (rank files, exported weights) and DeepSpeed's model file are read
with ``torch.load(weights_only=True)``, so no code in them runs. DeepSpeed's ZeRO-3 fp32 recovery
and torch.distributed.checkpoint's ``.metadata`` reader unpickle their files fully: read such
checkpoints only from a trusted source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moco_scale import checkpoint

BACKBONE = "encoder_q.backbone."
HEAD = "encoder_q.head."
FBMOCO_PREFIX = "module.encoder_q."


class WeightsError(ValueError):
    """Unusable weights; the message is one line."""


def read_module(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the MoCo module in checkpoint folder ``ckpt`` (both encoders, heads, queue, BN
    buffers), whole, on the CPU, read by the layout of the backend that wrote it."""
    module = checkpoint.engine_layout(ckpt).read_module(ckpt)
    if not any(name.startswith(BACKBONE) for name in module):
        raise WeightsError(f"{ckpt}: no {BACKBONE}* tensors; not a moco_scale checkpoint")
    return module


def strip(module: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix``, renamed without it, as standalone contiguous copies.

    Copies, because under ZeRO 1/2 the stored tensors are views of one flat buffer that
    ``torch.save`` would otherwise write out whole.
    """
    return {
        k[len(prefix) :]: v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in module.items()
        if k.startswith(prefix)
    }


def load_backbone(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The query backbone's ``state_dict`` (torchvision names, no ``fc.*``) and the run's config (``{}`` when
    unknown) from a checkpoint folder, a run's checkpoints folder or run directory, or an exported file
    (``--layout torchvision`` or ``fbmoco``)."""
    path = Path(source)
    if path.is_dir():
        ckpt = checkpoint.locate(path)
        # The rank file first, so a bad one stops before DeepSpeed's or DCP's readers; a folder without one
        # gets read_module's error naming what it lacks.
        meta = checkpoint.read_meta(ckpt) if (ckpt / "rank_00000.pt").is_file() else None
        module = read_module(ckpt)
        meta = checkpoint.read_meta(ckpt) if meta is None else meta
        return strip(module, BACKBONE), dict(meta.get("config") or {})
    if not path.is_file():
        raise WeightsError(f"{str(path)!r} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise WeightsError(f"{path}: unreadable weights file ({reason})") from None
    if isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict):  # fb/moco's layout
        saved = strip(saved["state_dict"], FBMOCO_PREFIX)
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise WeightsError(f"{path}: not a state_dict of tensors")
    return {k: v for k, v in saved.items() if not k.startswith("fc.")}, {}
