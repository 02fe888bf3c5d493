"""DeepSpeed backend: the DeepSpeed JSON is generated from the run config, and the engine owns precision.

Precision policy. Parameters, BatchNorm buffers, the queue and the optimizer state stay in
fp32; convolutions and linear layers run in bf16 or fp16 under ``torch.autocast`` (DeepSpeed's
``torch_autocast`` section); the loss is computed in fp32; fp16 uses dynamic loss scaling.
DeepSpeed's own ``bf16``/``fp16`` modes are never used: they cast parameters but not buffers,
which breaks BatchNorm.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco_scale.checkpoint import CheckpointError, whole_torch_file
from moco_scale.distributed.grad_sync import OverlappedGradientAverager
from moco_scale.engine.base import (
    COMPUTE_DTYPES,
    CheckpointLayout,
    OptimizerFactory,
    StepRollback,
    TrainEngine,
    WholeBackboneCopy,
    any_nonfinite,
    optimizer_step_skipped,
)
from moco_scale.engine.deepspeed_internals import (
    MODEL_FILE,
    ZERO3_MODEL_GLOB,
    ZERO_SHARD_GLOB,
    ZERO_SHARD_PATTERN,
    autocast_grad_scaler,
    disable_backward_allreduce,
    is_zero3_partitioned,
    local_shard,
    refresh_parameter_state_views,
    restore_step_counters,
    skip_cpu_shm_all_reduce,
    zero3_full_shape,
    zero3_model_file,
    zero_partitions,
    zero_shard_file,
    zero_shard_globals,
)
from moco_scale.moco import MoCo, MocoOutput
from moco_scale.models.init import ShardWriter
from moco_scale.observe import profiling

BUCKET_ELEMENTS = 10_000_000


def deepspeed_config(
    precision: str, zero_stage: int, micro_batch: int, world_size: int, grad_clip: float = 0.0
) -> dict[str, Any]:
    """The one DeepSpeed JSON, derived from the run config."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": grad_clip,  # DeepSpeed's default is 1.0; the MoCo papers do not clip
        "zero_optimization": {
            "stage": zero_stage,
            # DeepSpeed's defaults (buckets of 5e8 elements, 1e9 live ZeRO-3 parameters) are sized for
            # billion-parameter models: 2 GB fp32 buckets outweigh a ResNet's whole gradient. 1e7
            # elements (40 MB fp32) cut R50x2's peak per rank by 13% (ZeRO-2) and 33% (ZeRO-3).
            "reduce_bucket_size": BUCKET_ELEMENTS,
            "allgather_bucket_size": BUCKET_ELEMENTS,
        },
        "zero_allow_untested_optimizer": True,  # our own SGD/LARS/AdamW, not DeepSpeed's JIT-built ones
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        # Partition every parameter, however small: the key encoder's momentum update writes the
        # local shards, and a parameter kept whole on every rank would not see it until re-gathered.
        config["zero_optimization"] |= {
            "stage3_param_persistence_threshold": 0,
            "model_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": BUCKET_ELEMENTS,
            "stage3_max_live_parameters": BUCKET_ELEMENTS,
            # The optimizer steps one sub-group at a time, on a flat copy of its gradients and with temporaries
            # as large as the sub-group; DeepSpeed's default (1e12) makes this rank's whole partition one
            # sub-group. 1e7 elements cut the live bytes at ViT-B's optimizer step from 1929 to 1432 MiB per rank
            # (64 px, 2 ranks, fp32, AdamW; malloc'd bytes in use, benchmarks/memory.py's live_peak_mib).
            "sub_group_size": BUCKET_ELEMENTS,
        }
    if precision != "fp32":
        config["torch_autocast"] = {"enabled": True, "dtype": str(COMPUTE_DTYPES[precision]).removeprefix("torch.")}
    return config


def _partition_for(shards: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """This rank's ``size``-long slice of the flat tensor whose old partitions are ``shards``.

    ZeRO 1/2 lay a parameter group out as one flat tensor in parameter order, zero-padded at the
    end to a multiple of the world size, and give rank r the r-th equal slice; so a new world size
    only moves the cut points (and the amount of end padding)."""
    flat = torch.cat([shard.flatten() for shard in shards])
    part = flat[rank * size : (rank + 1) * size]
    return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part


def _load_zero_shard(file: Path) -> dict[str, Any]:
    """DeepSpeed's optimizer shard ``file`` on the CPU, with ``weights_only=True`` and only those types allowed:
    a file that names any other Python global is refused, not run."""
    with torch.serialization.safe_globals(zero_shard_globals()):
        return torch.load(file, map_location="cpu", weights_only=True)


def reshard_zero_optimizer(zero_optimizer: Any, path: Path, saved_world_size: int) -> None:
    """Restore this rank's ZeRO 1/2 optimizer state (e.g. SGD momentum, Adam moments and step) from
    the ``saved_world_size`` shards of checkpoint ``path``, cut for the current world size.

    The fp32 master partition, already refreshed from the loaded module, is checked against the
    re-cut saved one: a mismatch means another parameter layout and raises instead of corrupting."""
    from deepspeed import comm

    files = [path / zero_shard_file(r) for r in range(saved_world_size)]
    saved = [_load_zero_shard(file)["optimizer_state_dict"] for file in files]
    process_group, base, masters = zero_partitions(zero_optimizer)
    rank = comm.get_rank(group=process_group)
    for group, master in enumerate(masters):
        size = master.numel()
        saved_master = _partition_for([s["single_partition_of_fp32_groups"][group] for s in saved], rank, size)
        if not torch.equal(saved_master.to(master.device), master.detach()):
            raise RuntimeError(f"{path}: the saved ZeRO parameter layout differs from this run's; cannot re-cut it")
        saved_states = [s["base_optimizer_state"]["state"].get(group, {}) for s in saved]
        own_numel = saved[0]["single_partition_of_fp32_groups"][group].numel()
        state = base.state[master]
        for key, value in saved_states[0].items():
            if isinstance(value, torch.Tensor) and value.numel() == own_numel:
                value = _partition_for([s[key] for s in saved_states], rank, size)
            state[key] = value.to(master.device) if isinstance(value, torch.Tensor) else value
    refresh_parameter_state_views(zero_optimizer)


class GradientWatch:
    """Notes whether any gradient that reaches the trainable parameters is non-finite, from a hook on each
    parameter: under ZeRO 1-3 DeepSpeed moves the gradients into its own partitioned buffers during
    backward, so they cannot be read afterwards through the parameters. One norm per gradient, no sync."""

    def __init__(self, params: list[nn.Parameter]):
        self.norms: list[torch.Tensor] = []
        for param in params:
            param.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        self.norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

    def pop_nonfinite(self) -> torch.Tensor:
        """Whether any gradient since the last call was non-finite; forgets them."""
        nonfinite = any_nonfinite(self.norms)
        self.norms = []
        return nonfinite


class ZeroPartitionWriter(ShardWriter):
    """Writes a full initial value into this rank's ZeRO-3 partition: a slice of the flattened parameter,
    ``ceil(numel / world)`` long, the last one padded with zeros. Buffers are not partitioned."""

    def shape(self, tensor: torch.Tensor) -> torch.Size:
        return zero3_full_shape(tensor) if is_zero3_partitioned(tensor) else tensor.shape

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        if not is_zero3_partitioned(tensor):
            tensor.copy_(value)
            return
        part = local_shard(tensor)
        start = torch.distributed.get_rank() * part.numel()
        piece = value.flatten()[start : start + part.numel()]
        part.zero_()
        part[: piece.numel()].copy_(piece)


def build_partitioned(build: Callable[[], MoCo], config: dict[str, Any], seed: int) -> MoCo:
    """ZeRO-3 without the whole model on any rank: ``build`` runs under ``deepspeed.zero.Init`` (each
    parameter partitioned as it is created), then every rank draws its partitions (``MoCo.initialise``),
    the values a whole build initialised from ``seed`` has."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # joins the existing group
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build()
    model.initialise(seed, ZeroPartitionWriter())
    return model


class DeepSpeedCheckpointLayout(CheckpointLayout):
    """DeepSpeed's files: under ZeRO 0-2 rank 0's model file (the whole module; under ZeRO-0 the optimizer
    too), under ZeRO-3 one model file per rank (its parameter partitions) instead; under ZeRO 1-3 one
    optimizer shard per rank."""

    description = "DeepSpeed's *model_states.pt"

    def wrote(self, folder: Path) -> bool:
        return (folder / MODEL_FILE).is_file() or any(folder.glob(ZERO_SHARD_GLOB))

    def writer(self, name: str) -> int | None:
        shard = re.fullmatch(ZERO_SHARD_PATTERN, name)
        return int(shard.group(1)) if shard else (0 if name == MODEL_FILE else None)

    def expected_files(self, folder: Path, world_size: int) -> list[Path]:
        ranks = range(world_size)
        if any(folder.glob(ZERO3_MODEL_GLOB)):
            return [folder / name for r in ranks for name in (zero3_model_file(r), zero_shard_file(r))]
        shards = [folder / zero_shard_file(r) for r in ranks] if any(folder.glob(ZERO_SHARD_GLOB)) else []
        return [folder / MODEL_FILE, *shards]

    def check(self, folder: Path) -> None:
        """Each file is a whole ``torch.save`` zip (a truncated one has no directory)."""
        for file in sorted(folder.glob("*.pt")):
            if self.writer(file.name) is not None and not whole_torch_file(file):
                raise CheckpointError(f"{file} is truncated or unreadable")

    def read_module(self, folder: Path) -> dict[str, torch.Tensor]:
        """ZeRO 0-2: the model file, read with ``weights_only`` (memory-mapped). ZeRO-3: the partitions put
        back together by DeepSpeed's fp32 recovery, which unpickles the files fully."""
        self.check(folder)
        if any(folder.glob(ZERO3_MODEL_GLOB)):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        file = folder / MODEL_FILE
        try:
            states = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
            raise CheckpointError(f"{file}: unreadable or truncated checkpoint file ({reason})") from None
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CheckpointError(f"{file}: no module state; not a DeepSpeed model file")
        return states["module"]


class DeepSpeedEngine(TrainEngine):
    """Wraps :class:`MoCo` in ``deepspeed.initialize``; only the query side has trainable parameters.

    Under ZeRO-0 on several ranks the gradients are averaged by :class:`OverlappedGradientAverager`
    while backward runs, instead of by DeepSpeed after it.
    Under ZeRO-3 both encoders are partitioned alike, so the key encoder's momentum update runs on
    the local partitions (no gather), and ``backbone_factory`` builds the whole copy to evaluate.
    ZeRO-3 checkpoints resume on the world size that wrote them only."""

    layout = DeepSpeedCheckpointLayout()

    def __init__(
        self,
        model: MoCo,
        make_optimizer: OptimizerFactory,
        precision: str,
        zero_stage: int,
        micro_batch: int,
        world_size: int,
        grad_clip: float = 0.0,
        backbone_factory: Callable[[], nn.Module] | None = None,
    ):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        if next(model.parameters()).device.type == "cpu":
            skip_cpu_shm_all_reduce()
        self.model = model
        self.config = deepspeed_config(precision, zero_stage, micro_batch, world_size, grad_clip)
        self.base_optimizer = make_optimizer(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.base_optimizer, config=self.config
        )
        self.step_rollback = StepRollback(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fp16's loss scaler skips the steps whose scaled gradients overflow by itself; the loss is still checked.
        self.check_gradients = precision != "fp16"
        self._watch = GradientWatch(trainable) if zero_stage and self.check_gradients else None
        self._gradients: OverlappedGradientAverager | None = None
        if zero_stage == 0:  # DeepSpeed would reduce after backward, flattening every gradient each step
            disable_backward_allreduce(self.engine)
            if world_size > 1:
                self._gradients = OverlappedGradientAverager(trainable)
        self.sharded_parameters = zero_stage == 3
        self.reshardable = not self.sharded_parameters
        self._whole_backbone = WholeBackboneCopy(backbone_factory) if backbone_factory else None
        if self.sharded_parameters:  # both encoders are partitioned alike: the momentum update stays local
            model.use_local_shards(local_shard)

    def _forward(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> MocoOutput:
        return self.engine(view1, view2, step=step)  # DeepSpeed's wrapper applies its torch_autocast policy

    def _backward(self, loss: torch.Tensor) -> None:
        # ZeRO 1-3: DeepSpeed reduces the gradients inside backward (timed as comm); ZeRO-0: our averager.
        if self._gradients is not None:  # backward accumulates into the averager's buckets
            self._gradients.attach()
        with profiling.timed_calls(self.engine, "allreduce_gradients", "comm"):
            self.engine.backward(loss)
        if self._gradients is not None:  # what is left of the reductions that overlapped the backward
            with profiling.stage("comm"):
                self._gradients.wait()

    def _nonfinite_gradients(self) -> torch.Tensor:
        if self._watch is not None:
            return self._watch.pop_nonfinite()
        if not self.check_gradients:
            return torch.zeros((), dtype=torch.bool)
        return any_nonfinite([p.grad for p in self.model.parameters() if p.grad is not None])

    def _optimizer_step(self, skipped: bool) -> None:
        if skipped:  # DeepSpeed's step still runs its bookkeeping (zeroing gradients, its counters)
            with optimizer_step_skipped(self.base_optimizer):
                self.engine.step()
        else:
            self.engine.step()

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler, which DeepSpeed's ``torch_autocast`` mode keeps but does not checkpoint."""
        return autocast_grad_scaler(self.engine, self.optimizer)

    def query_backbone(self) -> nn.Module:
        if not self.sharded_parameters:
            return super().query_backbone()
        import deepspeed

        if self._whole_backbone is None:
            raise ValueError("evaluating under ZeRO-3 needs the engine's backbone_factory")
        backbone = self.model.encoder_q.backbone
        with deepspeed.zero.GatheredParameters(list(backbone.parameters())):
            state = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
        return self._whole_backbone(state)

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        scaler = self._grad_scaler()
        client_state = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int) -> None:
        resharding = self.engine.zero_optimization() and saved_world_size != self.engine.dp_world_size
        # DeepSpeed refuses ZeRO optimizer shards of another world size: load the module (both
        # encoders, queue, BN buffers) through it, and re-cut the optimizer shards ourselves.
        load_path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, load_module_only=resharding)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {load_dir}")
        if resharding:
            reshard_zero_optimizer(self.engine.optimizer, Path(load_dir) / tag, saved_world_size)
            restore_step_counters(self.engine, client_state)
        scaler = self._grad_scaler()
        if scaler is not None and "grad_scaler" in client_state:
            scaler.load_state_dict(client_state["grad_scaler"])
