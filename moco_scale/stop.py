"""Stop requests: SIGTERM or SIGUSR1 (pre-emption, SLURM's ``--signal`` warning) mean "finish the step,
save, exit 0".

``launchers/pretrain.py`` installs the handlers first thing, before its imports (seconds of them), so a
signal during start-up is kept, not fatal; only the interpreter's own start (tens of milliseconds) is
left uncovered.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch takes seconds to import; the handlers must not wait for it
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Whether this rank was asked to stop, and whether any rank was (``agreed``)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopRequest:
        """Catch the stop signals from now on (again: harmless)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # restart a system call it interrupts (a write of a checkpoint)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled, so all stop after the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOP = StopRequest()  # the process's one request: the signal handlers are process-wide
