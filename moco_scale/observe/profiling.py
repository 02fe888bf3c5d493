"""Wall time per training stage, per step: a stage timer that costs nothing while it is off.

The step marks its stages with ``profiling.stage(name)`` (a context) or ``profiling.timed_calls(obj,
method, name)`` (every call of a method, within a block). They record into the :class:`StageTimer` that
is active (``with timer:``) and only inside one of its steps (``with timer.step():``); otherwise they are
a shared null context, so an unprofiled step pays one global lookup per marker.

    timer = StageTimer(device)            # StageTimer(device, enabled=False): every call a no-op
    with timer:
        for step in range(steps):
            with timer.step():
                with timer.stage("data_wait"):
                    view1, view2, _ = next(batches)
                engine.train_step(view1, view2, lr=lr, momentum=m, step=step)
            if logging_now:
                record.update(timer.pop_means())  # mean ms per step since the last call

Stages nest, and a stage's time excludes the stages inside it, so the stages of a step never add
up to more than the step; ``other`` is what no stage covers (DeepSpeed's forward wrapper, the
learning-rate update, Python). On CUDA every boundary synchronises the device, so a stage's time
includes the GPU work it launched, and the synchronisation slows the step: measure throughput with
the timer off and the breakdown with it on.

The stages of a MoCo step (``STAGES``), marked by the training loop and ``TrainEngine.train_step`` (the
boundary between trainer and engine), none in the algorithm's code:

- ``data_wait``: waiting for the next batch (timed by the caller);
- ``query_fwd_bwd``: the query forward and the backward (``engine.backward``, less ``comm``);
- ``key_fwd``: the key forward, shuffle-BN's two ``all_to_all`` included (calls of ``MoCo.encode_keys``);
- ``ema``: the momentum update (``MoCo.momentum_update``);
- ``queue_loss``: logits and InfoNCE (calls of ``MoCo.contrast``) and the enqueue with its key ``all_gather``;
- ``optimizer``: ``engine.step()`` (under ZeRO 1/2 also the all-gather of the updated parameters);
- ``comm``: DeepSpeed's gradient reduction. DeepSpeed runs it inside ``engine.backward``, after
  autograd has finished, as one call of ``engine.allreduce_gradients`` (ZeRO 0: the bucketed
  all-reduce; ZeRO 1: the optimizer's ``reduce_gradients``); the engine times the calls of that
  method with :func:`timed_calls` while ``backward`` runs. So under ZeRO 0 and 1 ``comm`` is the whole
  gradient reduction, measured where it happens. Under ZeRO 2 the reduce-scatter of each full bucket
  runs in autograd hooks during the backward pass and stays in ``query_fwd_bwd``; only the epilogue
  (the last bucket) is in ``comm``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

STAGES = ("data_wait", "query_fwd_bwd", "key_fwd", "ema", "queue_loss", "optimizer", "comm")
STAGE_PREFIX = "ms_"  # per-stage milliseconds of a step, as the training loop logs them

_NULL = contextlib.nullcontext()
_active: StageTimer | None = None

F = TypeVar("F", bound=Callable[..., Any])


class StageTimer:
    """Records, per step, the milliseconds spent in each named stage.

    ``steps`` holds one dict per finished step: stage name -> ms (exclusive of nested stages), plus
    ``other`` (the step's time outside every stage) and ``step`` (its wall time).
    """

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.steps: list[dict[str, float]] = []
        self._in_step = False
        self._current: dict[str, float] = {}
        self._nested: list[float] = []  # per open stage, the seconds spent in the stages inside it
        self._previous: StageTimer | None = None

    def __enter__(self) -> StageTimer:
        global _active
        if self.enabled:
            self._previous, _active = _active, self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        if self.enabled:
            _active, self._previous = self._previous, None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> contextlib.AbstractContextManager[None]:
        """One training step: the stages timed inside it become one entry of ``steps``."""
        return self._step() if self.enabled else _NULL

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as stage ``name`` (added up if the stage occurs several times in a step)."""
        return self._stage(name) if self._in_step else _NULL

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        self._current, self._in_step = {}, True
        start = self._now()
        try:
            yield
        finally:
            total_ms = (self._now() - start) * 1e3
            record, self._current, self._in_step = self._current, {}, False
            record["other"] = total_ms - sum(record.values())
            record["step"] = total_ms
            self.steps.append(record)

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self._nested.append(0.0)
        start = self._now()
        try:
            yield
        finally:
            elapsed = self._now() - start
            inner = self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
            self._current[name] = self._current.get(name, 0.0) + (elapsed - inner) * 1e3

    def pop_means(self) -> dict[str, float]:
        """Mean ms per step of every stage, ``other`` and ``step`` over the steps recorded since the
        last call (a stage absent from a step counts 0 there); the records are cleared. ``{}`` if none."""
        steps, self.steps = self.steps, []
        return mean_breakdown(steps)


def mean_breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean ms per step of each name in ``steps`` records, in ``STAGES`` order, then the rest."""
    if not steps:
        return {}
    seen = {name for record in steps for name in record}
    names = [s for s in STAGES if s in seen] + sorted(seen - set(STAGES) - {"other", "step"})
    names += [n for n in ("other", "step") if n in seen]
    return {name: sum(record.get(name, 0.0) for record in steps) / len(steps) for name in names}


def stage(name: str) -> contextlib.AbstractContextManager[None]:
    """Time the block as stage ``name`` in the active timer; a no-op when none is active."""
    timer = _active
    return _NULL if timer is None else timer.stage(name)


def _timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is timed as stage ``name`` in the active timer."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            timer = _active
            if timer is None:
                return fn(*args, **kwargs)
            with timer.stage(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def _timing_calls(obj: object, method: str, name: str) -> Iterator[None]:
    had_own = method in vars(obj)
    original = getattr(obj, method)
    setattr(obj, method, _timed(name)(original))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, method, original)
        else:
            delattr(obj, method)  # the class's method shows through again


def timed_calls(obj: object, method: str, name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, calls of ``obj.method`` (from anywhere, e.g. inside a library) are timed as
    stage ``name``; a no-op unless a timer is active. Used for work a library does out of our sight."""
    timer = _active
    return _NULL if timer is None or not timer._in_step else _timing_calls(obj, method, name)
