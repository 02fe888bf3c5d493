"""A pretrained query backbone's weights: read from a checkpoint, or from a file that launchers/export.py wrote.

Checkpoints are read on the CPU with no process group, whatever wrote them: rank 0's DeepSpeed
model file (ZeRO 0-2 keep the whole module there), the ZeRO-3 partitions put back together, or an
FSDP2 run's torch.distributed.checkpoint files.

Whatever moco_scale wrote itself (rank files, exported weights) and DeepSpeed's model file are read
with ``torch.load(weights_only=True)``, so no code in them runs. DeepSpeed's ZeRO-3 fp32 recovery
and torch.distributed.checkpoint's ``.metadata`` reader unpickle their files fully: read such
checkpoints only from a trusted source.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from moco_scale import checkpoint
from moco_scale.engine.deepspeed_internals import MODEL_FILE

BACKBONE = "encoder_q.backbone."
HEAD = "encoder_q.head."
FBMOCO_PREFIX = "module.encoder_q."


class WeightsError(ValueError):
    """Unusable weights; the message is one line."""


def model_file(ckpt: Path) -> Path:
    """Rank 0's DeepSpeed model file in ``ckpt``."""
    if (ckpt / MODEL_FILE).is_file():
        return ckpt / MODEL_FILE
    found = sorted(ckpt.glob("*model_states.pt"))
    if not found:
        raise WeightsError(f"{str(ckpt)!r} holds no checkpoint (no *model_states.pt, no latest)")
    return found[0]


def load_model_states(file: Path) -> dict[str, Any]:
    """The model file's contents on the CPU, memory-mapped when possible; one-line error if unreadable."""
    try:
        states = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise WeightsError(f"{file}: unreadable or truncated checkpoint file ({reason})") from None
    if not isinstance(states, dict) or not any(k.startswith(BACKBONE) for k in states.get("module", {})):
        raise WeightsError(f"{file}: no {BACKBONE}* tensors; not a moco_scale checkpoint")
    return states


def _zero_stage(states: dict[str, Any]) -> int:
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def read_module(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the MoCo module in checkpoint folder ``ckpt`` (both encoders, heads, queue, BN
    buffers), whole, on the CPU."""
    if (ckpt / ".metadata").is_file():  # FSDP2: torch.distributed.checkpoint
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = _load_state_dict_from_keys({"model"}, checkpoint_id=str(ckpt))
        return state["model"]
    states = load_model_states(model_file(ckpt))
    if _zero_stage(states) != 3:
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


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
