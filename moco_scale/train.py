"""MoCo pretraining on one rank, top to bottom, importable.

``main`` is the command line (``launchers/pretrain.py`` calls it); ``pretrain`` is the run; ``build_engine``
and ``build_batches`` are what a benchmark or a test needs to build the same model, engine and data.
Bad input is rejected in one line before any process group, model or data loader is created.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moco_scale import checkpoint
from moco_scale.config import (
    Config,
    ConfigError,
    check_resumable,
    load_config,
    parse_cli_overrides,
    save_config,
    validate,
)
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.loader import Batch, LoaderLayout, backend_of, remap_state, resolve_backend, two_view_batches
from moco_scale.data.shards import DataError, StreamSpec
from moco_scale.data.sources import count_samples, list_inputs
from moco_scale.distributed.comm import DistInfo, init_distributed, leave_if_groups_linger, shutdown_distributed
from moco_scale.engine.base import COMPUTE_DTYPES, TrainEngine
from moco_scale.engine.deepspeed import DeepSpeedEngine, build_partitioned, deepspeed_config
from moco_scale.engine.fsdp import FSDPEngine
from moco_scale.eval.knn import KnnMonitor
from moco_scale.moco import MoCo
from moco_scale.models import build_backbone
from moco_scale.observe.loggers import open_sinks, run_ids
from moco_scale.observe.metrics import CollapseWatch, MetricsLogger, chance_loss, code_version, queue_size_warning
from moco_scale.observe.plot import plot_run
from moco_scale.observe.profiling import STAGE_PREFIX, StageTimer
from moco_scale.optim import build_optimizer, key_momentum, learning_rate, linear_scaled_lr
from moco_scale.stop import STOP


def resolve_inputs(cfg: Config) -> tuple[list[str], list[str], list[str]]:
    """The training input (shards, or an ImageFolder root or list file: ``list_inputs``), and the kNN monitor's
    bank and held-out inputs (none while it is off).
    ``demo`` means the built-in digits (written on first use): its training and held-out splits."""
    demo = {name: str(path) for name, path in ensure_demo_shards().items()} if cfg.data.path == "demo" else {}
    train = list_inputs(demo.get("train", cfg.data.path))
    if not cfg.eval.every_steps:
        return train, [], []
    bank = list_inputs(cfg.eval.bank_path, "eval.bank_path") if cfg.eval.bank_path else train
    return train, bank, list_inputs(cfg.eval.val_path or demo["val"], "eval.val_path")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def uses_channels_last(cfg: Config, ctx: DistInfo) -> bool:
    return cfg.model.channels_last and ctx.device.type == "cuda"


def build_engine(cfg: Config, ctx: DistInfo, peak_lr: float) -> tuple[MoCo, TrainEngine]:
    """The MoCo module on this rank's device, and the engine (DeepSpeed or FSDP2) that shards and trains it."""
    seed_everything(cfg.train.seed)  # the same seed everywhere builds the same model and queue on every rank

    def backbone() -> torch.nn.Module:
        return build_backbone(cfg.model, cfg.data.image_size)

    def moco(key_backbone: torch.nn.Module | None = None) -> MoCo:
        return MoCo(
            backbone(),
            cfg.moco,
            world_size=ctx.world_size,
            cuda_graph_ema=cfg.engine.cuda_graph_ema,
            shuffle_seed=cfg.train.seed,
            key_channels_last=cfg.model.channels_last,
            key_backbone=key_backbone,
        )

    # Where the backend shards the parameters, no rank builds the whole model (engine.sharded_build): FSDP2 builds
    # on the meta device and draws each shard; ZeRO-3 partitions as it builds. Elsewhere the whole build draws the
    # same values.
    precision = cfg.engine.resolved_precision(ctx.device.type)
    shards_parameters = cfg.engine.backend == "fsdp" or cfg.engine.zero_stage == 3
    sharded_build = cfg.engine.sharded_build and shards_parameters
    if sharded_build and cfg.engine.backend == "fsdp":
        with torch.device("meta"):
            model = moco()
    elif sharded_build:
        config = deepspeed_config(precision, 3, cfg.train.batch_size, ctx.world_size, cfg.optim.grad_clip)
        model = build_partitioned(lambda: moco(key_backbone=backbone()), config, cfg.train.seed)
    else:
        model = moco()
        model.initialise(cfg.train.seed)
        # FSDP2 (built whole when engine.sharded_build=false) shards contiguous parameters only.
        channels_last = uses_channels_last(cfg, ctx) and cfg.engine.backend != "fsdp"
        model.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        o = cfg.optim
        return build_optimizer(
            module, o.name, peak_lr, o.momentum, o.weight_decay, o.betas, o.trust_coefficient, ctx.device.type
        )

    if cfg.engine.backend == "fsdp":
        # FSDP2 shards contiguous parameters only; convolutions still take channels-last views as they come.
        materialise = (ctx.device, cfg.train.seed) if sharded_build else None
        engine = FSDPEngine(model, make_optimizer, precision, cfg.optim.grad_clip, backbone, materialise=materialise)
        return model, engine
    engine = DeepSpeedEngine(
        model,
        make_optimizer,
        precision,
        cfg.engine.zero_stage,
        cfg.train.batch_size,
        ctx.world_size,
        grad_clip=cfg.optim.grad_clip,
        backbone_factory=backbone,
    )
    return model, engine


def build_batches(cfg: Config, ctx: DistInfo, inputs: list[str], state: dict | None = None) -> Iterator[Batch]:
    """This rank's endless ``(view1, view2, labels)`` batches, from ``state`` when resuming."""
    d = cfg.data
    views = cfg.aug.views(d.image_size)
    stream = StreamSpec(inputs, views, cfg.train.batch_size, ctx.rank, ctx.world_size, d.seed, d.shuffle_buffer)
    return two_view_batches(
        d.backend,
        stream,
        workers=d.workers,
        device=ctx.device,
        channels_last=uses_channels_last(cfg, ctx),
        dtype=COMPUTE_DTYPES[cfg.engine.resolved_precision(ctx.device.type)],
        state=state,
    )


class Diverged(RuntimeError):
    """``train.max_bad_steps`` non-finite steps in a row; the message is one line."""


def pretrain(cfg: Config, inputs: list[str], knn_bank: list[str], knn_val: list[str], resume_from: Path | None) -> None:
    stop = STOP.install()  # installed already when run as a script; from here on a signal ends in a checkpoint
    ctx = init_distributed(cfg.engine.device, cfg.engine.timeout_s)
    global_batch = cfg.train.batch_size * ctx.world_size
    num_samples = count_samples(inputs)
    steps_per_epoch = math.ceil(num_samples / global_batch)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup_steps = cfg.optim.warmup_steps or round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak_lr = linear_scaled_lr(cfg.optim.base_lr, global_batch)
    run_dir = Path(cfg.train.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    if ctx.is_main:
        nodes = ctx.world_size // ctx.local_world_size
        print(
            f"pretraining on {ctx.world_size} ranks ({nodes} nodes x {ctx.local_world_size}, {ctx.device.type}): "
            f"global batch {global_batch}, {total_steps} steps, {num_samples:,} samples",
            flush=True,
        )
    model, engine = build_engine(cfg, ctx, peak_lr)
    memory_format = torch.channels_last if uses_channels_last(cfg, ctx) else torch.contiguous_format
    start_step, loader_state, saved = 0, None, {}
    if resume_from is not None:
        start_step, loader_state, saved_world_size = checkpoint.load(engine, resume_from)
        saved = checkpoint.read_meta(resume_from)
        saved_config = saved.get("config", cfg.to_dict())
        backend = resolve_backend(cfg.data.backend, inputs)
        loader_state = remap_state(  # the same layout continues exactly; another restarts at the global count
            loader_state,
            LoaderLayout.of_run(saved_config, saved_world_size, backend_of(loader_state) or backend),
            LoaderLayout.of_run(cfg.to_dict(), ctx.world_size, backend),
        )
    else:
        seed_everything(cfg.train.seed * 1000 + ctx.rank + 1)  # from here on each rank draws its own randomness
    batches = build_batches(cfg, ctx, inputs, loader_state)
    knn = None
    if cfg.eval.every_steps:
        knn = KnnMonitor(
            knn_bank,
            knn_val,
            cfg.data.image_size,
            cfg.eval,
            ctx.rank,
            ctx.world_size,
            workers=cfg.data.workers,
            pin_memory=ctx.device.type == "cuda",
        )
    saved_step = start_step

    sinks = (
        open_sinks(cfg.train.loggers, run_dir, cfg.to_dict(), start_step, saved.get("run_ids", {}))
        if ctx.is_main
        else []
    )
    logger = MetricsLogger(run_dir, total_steps, start_step, ctx.is_main, cfg.train.progress, sinks)
    if ctx.is_main:  # rank 0 logs, and its headline (the checkpoint's until this run logs) is what is saved
        logger.headline.update(saved.get("metrics", {}))
    commit = code_version() if ctx.is_main else ""

    def save(step: int) -> None:
        nonlocal saved_step
        saved_step = step
        checkpoint.save(
            engine,
            run_dir,
            step,
            batches.state_dict(),
            cfg.to_dict(),
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every,
            meta={
                "epoch": round(step * global_batch / num_samples, 4),
                "num_samples": num_samples,
                "metrics": logger.headline,
                "git_commit": commit,
                "run_ids": run_ids(sinks),
            },
        )

    m = cfg.moco
    if warning := queue_size_warning(m.version, m.queue_size, num_samples):
        logger.warn(warning)
    collapse = CollapseWatch(
        chance_loss(m.version, m.queue_size, global_batch, m.temperature),
        start_step=max(warmup_steps, 2 * math.ceil(m.queue_size / global_batch)),
    )

    def knn_due(step: int) -> bool:
        return knn is not None and (step % cfg.eval.every_steps == 0 or step == total_steps)

    if start_step == 0 and knn_due(0):
        top1 = knn(engine.query_backbone())
        logger.log({"step": 0, "knn_top1": top1, "knn_bad_samples": knn.bad_samples})  # the random-init baseline
    timer = StageTimer(ctx.device)  # times the last step of each log window, stage by stage
    model.train()
    window_start, window_steps = time.perf_counter(), 0
    skipped_steps = bad_in_row = 0
    for step in range(start_step, total_steps):
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps or knn_due(step + 1)
        with timer, timer.step() if log_now else contextlib.nullcontext():
            with timer.stage("data_wait"):
                view1, view2, _ = next(batches)
                view1 = view1.to(ctx.device, non_blocking=True, memory_format=memory_format)
                view2 = view2.to(ctx.device, non_blocking=True, memory_format=memory_format)
            lr = learning_rate(step, total_steps, peak_lr, warmup_steps, cfg.optim.schedule, cfg.optim.step_milestones)
            momentum = key_momentum(step, total_steps, cfg.moco.momentum, cfg.moco.momentum_schedule)
            out = engine.train_step(view1, view2, lr=lr, momentum=momentum, step=step, stop_requested=stop.requested)
        # A skipped step changed nothing that a checkpoint holds but the key encoder's momentum update.
        skipped_steps, bad_in_row = skipped_steps + out.skipped, (bad_in_row + 1) if out.skipped else 0
        logger.advance()
        window_steps += 1
        if log_now:
            stats = torch.stack([out.loss.float(), out.inst_acc.float()])
            dist.all_reduce(stats)
            stats /= ctx.world_size
            elapsed = time.perf_counter() - window_start
            if warning := collapse.update(step + 1, stats[0].item()):
                logger.warn(warning)
            logger.log(
                {
                    "step": step + 1,
                    "loss": stats[0].item(),
                    "loss_chance": collapse.chance,
                    "inst_acc": stats[1].item(),
                    "lr": lr,
                    "momentum": momentum,
                    "pairs_per_s": window_steps * global_batch / elapsed,
                    "skipped_steps": skipped_steps,
                    **({"bad_samples": batches.bad_samples} if hasattr(batches, "bad_samples") else {}),
                    **{f"{STAGE_PREFIX}{stage}": ms for stage, ms in timer.pop_means().items()},
                    **(
                        {"knn_top1": knn(engine.query_backbone()), "knn_bad_samples": knn.bad_samples}
                        if knn_due(step + 1)
                        else {}
                    ),
                }
            )
            window_start, window_steps = time.perf_counter(), 0
        if bad_in_row >= cfg.train.max_bad_steps:
            logger.close()  # the error line must not land inside the progress bar
            raise Diverged(
                f"{bad_in_row} non-finite steps in a row (steps {step + 2 - bad_in_row}-{step + 1}; loss "
                f"{out.loss.item()}); nothing saved: lower optim.base_lr, or resume from the last checkpoint"
            )
        every = cfg.checkpoint.every_steps
        if out.stop:
            save(step + 1)
            if ctx.is_main:
                print(f"stopped by signal after step {step + 1}; checkpoint saved", flush=True)
            break
        if every and ((step + 1) % every == 0 or step + 1 == total_steps):
            save(step + 1)
    else:  # a signal during the last evaluation or save, or before a run with nothing left to do
        if stop.agreed(ctx.device) and saved_step != total_steps:
            save(total_steps)
            if ctx.is_main:
                print(f"stopped by signal after step {total_steps}; checkpoint saved", flush=True)
    summary = logger.close()
    if ctx.is_main:
        print(f"{summary}; plots: {', '.join(map(str, plot_run(run_dir)))}", flush=True)
    dist.barrier()


def main(config: str | None = None, local_rank: int | None = None, **overrides) -> None:
    """``--config`` names a YAML file; ``--local_rank`` is set by the deepspeed launcher (the
    environment's LOCAL_RANK is what counts); every other flag is ``--section.field=value``."""
    try:
        cfg = load_config(config, parse_cli_overrides(overrides))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world_size)
        inputs, knn_bank, knn_val = resolve_inputs(cfg)
        backend = resolve_backend(cfg.data.backend, inputs)
        resume_from = checkpoint.find_resume(cfg.checkpoint.resume, cfg.train.run_dir, world_size)
        if resume_from is not None:
            meta = checkpoint.read_meta(resume_from)
            saved_backend = backend_of(meta["loader"])
            switched = {"data.backend": (saved_backend, backend)} if saved_backend not in (None, backend) else {}
            check_resumable(meta.get("config", {}), cfg, str(resume_from), also_changed=switched)
        checkpoint.set_aside_newer(resume_from, cfg.train.run_dir)  # rank 0 only; see its docstring
    except (ConfigError, DataError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    exit_code = 0
    try:
        pretrain(cfg, inputs, knn_bank, knn_val, resume_from)
    except Diverged as err:  # every rank agreed on it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        exit_code = 3
    except RuntimeError as err:
        if not lost_a_rank(err):
            raise
        print(
            f"error: rank {os.environ.get('RANK', '0')}: a collective failed, so another rank died or hangs "
            f"({str(err).splitlines()[0][:200]}); resume with --checkpoint.resume=auto",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # the process group cannot be torn down without the lost rank
    shutdown_distributed()  # here, once pretrain's frame (model, engine) and any traceback of it are gone
    leave_if_groups_linger(exit_code)
    sys.exit(exit_code)


def lost_a_rank(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective that failed on a dead or hung peer (gloo or NCCL, error or timeout)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err)
