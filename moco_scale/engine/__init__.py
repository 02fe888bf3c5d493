"""Training engines: the step every backend shares (``base.py``) and one module per backend."""

from __future__ import annotations

from moco_scale.engine.base import CheckpointLayout


def checkpoint_layouts() -> tuple[CheckpointLayout, ...]:
    """The checkpoint file layout of every backend, to check or read a checkpoint without building an engine.
    A new backend adds its own here. (Imported on call: the backends import ``moco_scale.checkpoint``.)"""
    from moco_scale.engine.deepspeed import DeepSpeedEngine
    from moco_scale.engine.fsdp import FSDPEngine

    return DeepSpeedEngine.layout, FSDPEngine.layout
