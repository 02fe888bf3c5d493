"""launchers/pretrain.py with one fault injected: at step ``MOCO_NAN_AT_STEP`` rank 1's views are NaN.

Used by ``benchmarks/faults.py``; the package holds no fault hooks, so this wraps the algorithm from outside.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import torch

from moco_scale.moco import MoCo

NAN_AT_STEP = int(os.environ["MOCO_NAN_AT_STEP"])
plain_forward = MoCo.forward


def forward_with_nan(self: MoCo, view1: torch.Tensor, view2: torch.Tensor, step: int):
    if step == NAN_AT_STEP and os.environ.get("RANK") == "1":
        view1, view2 = torch.full_like(view1, float("nan")), torch.full_like(view2, float("nan"))
    return plain_forward(self, view1, view2, step)


MoCo.forward = forward_with_nan
runpy.run_path(str(Path(__file__).resolve().parent.parent / "launchers" / "pretrain.py"), run_name="__main__")
