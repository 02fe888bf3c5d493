"""FSDP2 backend: ``torch.distributed.fsdp.fully_shard`` over both encoders, checkpoints through
``torch.distributed.checkpoint`` (sharded on save, re-cut on load, so the world size may change).

Sharding. The cut plan is the backbone family's own: every block of ``backbone.blocks()`` (a
ResNet's residual blocks, a ViT's transformer blocks) is an FSDP unit, then each encoder (its stem,
head and the rest) and the v3 predictor; cut the same way in the query and the key encoder, so a key
parameter's local shard lines up with its query twin's, and the momentum update is a local
multi-tensor op on the shards.

Precision policy, as in the DeepSpeed backend: parameters, BN buffers, the queue and the optimizer
state stay fp32; convolutions and linear layers run in bf16 under ``torch.autocast``; the loss is
fp32. (fp16, which needs a loss scaler agreed across shards, is left to the DeepSpeed backend.)
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moco_scale.checkpoint import CheckpointError
from moco_scale.engine.base import (
    COMPUTE_DTYPES,
    CheckpointLayout,
    OptimizerFactory,
    StepRollback,
    TrainEngine,
    WholeBackboneCopy,
    any_nonfinite,
)
from moco_scale.moco import MoCo, MocoOutput
from moco_scale.models.init import ShardWriter

DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a checkpoint's tensors, written by rank 0


def _local_shard(param: nn.Parameter) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def shard_moco(model: MoCo, mesh) -> None:
    """Make both encoders (block by block), the predictor and the whole module FSDP units."""
    for encoder in (model.encoder_q, model.encoder_k):
        for unit in encoder.backbone.blocks():  # the backbone family's cut plan
            fully_shard(unit, mesh=mesh)
        fully_shard(encoder, mesh=mesh)
    if model.predictor is not None:
        fully_shard(model.predictor, mesh=mesh)
    fully_shard(model, mesh=mesh)


class DTensorWriter(ShardWriter):
    """Writes a full initial value into this rank's FSDP2 shard: dim-0 chunks, as ``fully_shard`` cuts them."""

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        if not isinstance(tensor, DTensor):
            tensor.copy_(value)  # buffers are not sharded
            return
        mesh = tensor.device_mesh
        chunks = value.chunk(mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        local = tensor.to_local()
        local.copy_(chunks[rank] if rank < len(chunks) else value[:0])


class DcpCheckpointLayout(CheckpointLayout):
    """torch.distributed.checkpoint's files: the index ``.metadata`` (rank 0) and ``__<rank>_0.distcp`` per rank."""

    description = "torch.distributed.checkpoint's .metadata"

    def wrote(self, folder: Path) -> bool:
        return (folder / DCP_INDEX).is_file() or any(folder.glob("*.distcp"))

    def writer(self, name: str) -> int | None:
        data = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
        return int(data.group(1)) if data else (0 if name == DCP_INDEX else None)

    def expected_files(self, folder: Path, world_size: int) -> list[Path]:
        return [folder / DCP_INDEX] + [folder / f"__{r}_0.distcp" for r in range(world_size)]

    def check(self, folder: Path) -> None:
        """Every byte range that the index names lies inside its file."""
        try:
            storage = FileSystemReader(str(folder)).read_metadata().storage_data
        except Exception:
            raise CheckpointError(f"{folder / DCP_INDEX} is truncated or unreadable") from None
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            file = folder / name
            if not file.is_file() or file.stat().st_size < size:
                raise CheckpointError(f"{file} is truncated or missing")

    def read_module(self, folder: Path) -> dict[str, torch.Tensor]:
        """The ``model`` entry, whole, through DCP's reader (which unpickles ``.metadata`` fully)."""
        self.check(folder)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _load_state_dict_from_keys({"model"}, checkpoint_id=str(folder))["model"]


class FSDPEngine(TrainEngine):
    """Shards :class:`MoCo` with FSDP2; only the query side has trainable parameters.

    ``backbone_factory`` builds the whole query backbone that :meth:`query_backbone` fills with
    the gathered weights for evaluation. With ``materialise=(device, seed)`` the model was built on the
    meta device: it is sharded there, then each rank allocates its shards on ``device`` and draws them
    (``MoCo.initialise``), the same values as a whole build initialised from ``seed``."""

    reshardable = True
    layout = DcpCheckpointLayout()

    def __init__(
        self,
        model: MoCo,
        make_optimizer: OptimizerFactory,
        precision: str,
        grad_clip: float = 0.0,
        backbone_factory: Callable[[], nn.Module] | None = None,
        *,
        materialise: tuple[torch.device, int] | None = None,
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the FSDP backend runs fp32 or bf16, not {precision!r}")
        device = materialise[0] if materialise else next(model.parameters()).device
        # Single-process shuffle-BN (SplitBatchNorm) hands blocks a view; no block writes in place to
        # its input, so FSDP's warning about in-place ops on returned views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.model = model
        shard_moco(model, init_device_mesh(device.type, (torch.distributed.get_world_size(),)))
        if materialise is not None:  # built on the meta device: each rank allocates and draws its shards only
            model.to_empty(device=device)
            model.initialise(materialise[1], DTensorWriter())
        model.use_local_shards(_local_shard)
        self.optimizer = make_optimizer(model)
        self.autocast_dtype = None if precision == "fp32" else COMPUTE_DTYPES[precision]
        self.grad_clip = grad_clip
        self.step_rollback = StepRollback(model)
        self._whole_backbone = WholeBackboneCopy(backbone_factory) if backbone_factory else None

    def _forward(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> MocoOutput:
        with torch.autocast(view1.device.type, self.autocast_dtype or torch.bfloat16, self.autocast_dtype is not None):
            return self.model(view1, view2, step=step)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP reduce-scatters the gradients inside backward

    def _nonfinite_gradients(self) -> torch.Tensor:
        return any_nonfinite([_local_shard(p.grad) for p in self.model.parameters() if p.grad is not None])

    def _optimizer_step(self, skipped: bool) -> None:
        if not skipped:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def query_backbone(self) -> nn.Module:
        if self._whole_backbone is None:
            raise ValueError("evaluating under FSDP needs the engine's backbone_factory")
        state = {
            name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            for name, tensor in self.model.encoder_q.backbone.state_dict().items()
        }
        return self._whole_backbone(state)

    def _state(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        # Replicated tensors (BN statistics, which differ per rank; the queue) are saved from rank 0.
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        dcp.save(self._state(), checkpoint_id=f"{save_dir}/{tag}", planner=planner)

    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int) -> None:
        state = self._state()  # the shapes and shardings to load into; DCP re-cuts the saved shards
        dcp.load(state, checkpoint_id=f"{load_dir}/{tag}")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
