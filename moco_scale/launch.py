"""A one-node launcher that keeps a job's promises on signals and on a dead rank.

    python -m moco_scale.launch --nproc 2 launchers/pretrain.py --config configs/demo.yaml

``deepspeed`` and ``torchrun`` start the ranks too, but neither survives what a cluster sends a whole job:
a signal to every process of it (SLURM's ``--signal``, ``scancel --signal``, ``kill -USR1 -- -PGID``)
kills ``deepspeed``'s launcher at once (SIGUSR1) or makes it kill the ranks (SIGTERM), and ``torchrun``
exits non-zero. This launcher instead:

- passes SIGTERM and SIGUSR1 on to every rank (which finish their step, save and exit 0) and exits 0
  when they all have;
- ends the job as soon as one rank fails: it names the rank and its exit code or signal, kills the
  others (they could only wait for the lost rank until ``engine.timeout_s``) and exits with that rank's
  code (1 for a rank killed by a signal).

Across nodes, ``srun`` plays this part (see README, "SLURM").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from moco_scale.distributed.comm import free_port

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _describe(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def run(nproc: int, command: list[str], master_port: int | None = None, poll_s: float = 0.05) -> int:
    """Start ``command`` as ranks 0..nproc-1 on this machine and watch them; returns the job's exit code."""
    port = str(master_port or free_port())
    ranks: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        ranks.append(subprocess.Popen(command, env=env))
    while True:
        codes = [proc.poll() for proc in ranks]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            print(f"error: rank {rank} {_describe(code)}; ending the job", file=sys.stderr, flush=True)
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            return code if code > 0 else 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(poll_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="ranks to start on this machine")
    parser.add_argument("--master_port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("script", help="the training script, e.g. launchers/pretrain.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args()
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    sys.exit(run(args.nproc, [sys.executable, args.script, *args.args], args.master_port))


if __name__ == "__main__":
    main()
