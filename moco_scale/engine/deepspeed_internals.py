"""Every use of DeepSpeed beyond its public API, in one place.

The public API is ``deepspeed.initialize``, the engine's forward, ``backward``, ``step``,
``save_checkpoint`` and ``load_checkpoint``, ``deepspeed.zero.GatheredParameters`` and
``deepspeed.utils.zero_to_fp32``. Everything else moco_scale needs from DeepSpeed (checkpoint file
names, private attributes of the engine and the ZeRO optimizer, a module-level table) is read or
written here only. ``pyproject.toml`` pins the DeepSpeed releases these were read from and tested
with, and ``tests/test_deepspeed_internals.py`` exercises each of them on the installed DeepSpeed, so
an upgrade that moves one fails there, by name, rather than deep inside a resume.

Nothing here imports DeepSpeed at module import.
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the module (ZeRO-0: the optimizer too), written by rank 0
ZERO_SHARD_GLOB = "zero_pp_rank_*"  # ZeRO 1-3: one optimizer shard per rank; ZeRO-3: a model file per rank too
ZERO3_MODEL_GLOB = "zero_pp_rank_*_model_states.pt"
ZERO_SHARD_PATTERN = r"zero_pp_rank_(\d+)_.*"  # the rank that writes a shard, from its name


def zero_shard_file(rank: int) -> str:
    """The name of the ZeRO 1-3 optimizer shard that ``rank`` writes."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def zero3_model_file(rank: int) -> str:
    """The name of the ZeRO-3 model file that ``rank`` writes (its parameter partitions), in place of MODEL_FILE."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def zero_shard_globals() -> list[Any]:
    """The few DeepSpeed types a ZeRO 1/2 optimizer shard pickles beside tensors and plain values: the
    stage (an enum), the loss scaler (two numbers as attributes) and fragment addresses (two ints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def zero_partitions(zero_optimizer: Any) -> tuple[Any, torch.optim.Optimizer, list[torch.Tensor]]:
    """A ZeRO 1/2 optimizer's process group, the optimizer it wraps, and this rank's flat fp32
    partition of each parameter group (what the wrapped optimizer's state is keyed by)."""
    return zero_optimizer.dp_process_group, zero_optimizer.optimizer, zero_optimizer.single_partition_of_fp32_groups


def refresh_parameter_state_views(zero_optimizer: Any) -> None:
    """Rebuild a ZeRO 1/2 optimizer's per-parameter views of the optimizer state after it was replaced
    (``safe_get_full_optimizer_state`` reads through them)."""
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def local_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter."""
    return param.ds_tensor


def zero3_full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The whole shape of a ZeRO-3 parameter (its ``data`` is empty while it is partitioned)."""
    return param.ds_shape


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_tensor")


def disable_backward_allreduce(engine: Any) -> None:
    """Keep a ZeRO-0 engine from averaging the gradients after backward (we average them during it)."""
    engine.enable_backward_allreduce = False


def autocast_grad_scaler(engine: Any, optimizer: Any) -> torch.amp.GradScaler | None:
    """fp16's loss scaler under DeepSpeed's ``torch_autocast`` mode: the engine's under ZeRO-0, the
    ZeRO optimizer's otherwise; None in fp32 and bf16. DeepSpeed does not checkpoint it."""
    return engine.torch_autocast_z0_gradscaler or getattr(optimizer, "torch_autocast_gradscaler", None)


STEP_COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # in a checkpoint's client state


def restore_step_counters(engine: Any, client_state: dict[str, Any]) -> None:
    """Set the engine's step counters from a checkpoint's client state, as a full load would."""
    for counter in STEP_COUNTERS:
        setattr(engine, counter, client_state[counter])


def skip_cpu_shm_all_reduce() -> None:
    """Keep DeepSpeed from building and starting its shared-memory CPU all-reduce, which serves only its
    ``inference_all_reduce`` (never called here): it JIT-compiles a C++ op at start-up, maps a 66 MB
    workspace per rank from /dev/shm that it never removes, and took whole jobs down here (SIGSEGV in a
    probe; "terminate called without an active exception" at start-up in CI runs). DeepSpeed keeps its
    op-compatibility table as one module-level dict that it reads before building the op."""
    import deepspeed.ops

    if "deepspeed_shm_comm" not in deepspeed.ops.__compatible_ops__:
        raise RuntimeError("deepspeed.ops.__compatible_ops__ has no 'deepspeed_shm_comm' entry: DeepSpeed changed it")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
