"""What resuming the torch loader costs against the epochs already done: time to the first batch, and decodes.

The torch loader saves each reader's (epoch, samples served in it); a resume skips whole epochs by
arithmetic and the samples of the current epoch without decoding them. The replay baseline is what the
loader did before: rebuild the stream from step 0 and decode every sample up to the resume point. Both
resume half an epoch into epoch E of a tiny shard set (the demo's first 64 held-out digits, 4 shards,
batches of 8 pairs of 16 px views, one reader in the main process on one thread, as a DataLoader worker
runs, shuffle buffer 16) and take one batch; decodes are counted by wrapping the loader's decoder.
Rounds are interleaved and the median is reported.

    python benchmarks/resume_cost.py --json /tmp/resume_cost.json
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from benchmarks._common import environment, format_table, median, spread, time_interleaved, write_json
except ModuleNotFoundError:  # run as ``python benchmarks/resume_cost.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, time_interleaved, write_json

from moco_scale.data import torch_loader
from moco_scale.data.augment import moco_views
from moco_scale.data.demo import ensure_demo_shards
from moco_scale.data.shards import StreamSpec, list_shards, write_shards

SAMPLES, BATCH, BUFFER = 64, 8, 16
COLUMNS = ["epochs", "resume_ms", "resume_decodes", "replay_ms", "replay_decodes"]


def tiny_shards(folder: Path) -> list[str]:
    """The first ``SAMPLES`` held-out demo digits in 4 shards."""
    with tarfile.open(list_shards(str(ensure_demo_shards()["val"]))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})[:SAMPLES]
    samples = [(k, members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]
    return [str(s) for s in write_shards(samples, folder, samples_per_shard=SAMPLES // 4)]


def state_at(epoch: int) -> dict:
    """The state the loader saves half an epoch into ``epoch`` (one reader, nothing bad)."""
    served = SAMPLES // 2
    return {
        "readers": [[epoch, served, 0]],
        "batches": (epoch * SAMPLES + served) // BATCH,
        "samples": epoch * SAMPLES + served,
        "epoch_samples": SAMPLES,
        "bad_samples": 0,
    }


def resume(shards: list[str], epoch: int) -> None:
    """The new loader: from the saved position to the first batch."""
    stream = StreamSpec(shards, moco_views("v2", 16), BATCH, shuffle_buffer=BUFFER)
    batches = torch_loader.two_view_loader(stream, state=state_at(epoch))
    next(batches)


def replay(shards: list[str], epoch: int) -> None:
    """The baseline: the stream from step 0 with every sample up to the resume point decoded (not augmented), then
    a fresh loader's first batch (the same work as the resumed loader's)."""
    stream = torch_loader.TwoViewStream(shards, moco_views("v2", 16), 0, 1, shuffle_buffer=BUFFER)
    samples = stream.raw_stream()
    for _ in range(state_at(epoch)["samples"]):
        torch_loader.decode_sample(next(samples)[2])
    next(torch_loader.two_view_loader(StreamSpec(shards, moco_views("v2", 16), BATCH, shuffle_buffer=BUFFER)))


def count_decodes(run: Callable[[], None]) -> int:
    """Calls of the loader's decoder during ``run`` (one process: the loader runs without workers)."""
    decode = torch_loader.decode_sample
    calls = 0

    def counted(sample: dict | None) -> object:
        nonlocal calls
        calls += 1
        return decode(sample)

    torch_loader.decode_sample = counted
    try:
        run()
    finally:
        torch_loader.decode_sample = decode
    return calls


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 10, 40, 100], help="epochs done before resuming")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="epochs 1 and 3, 1 round: for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.rounds = [1, 3], 1
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as folder:
        shards = tiny_shards(Path(folder))
        methods = {
            f"{name} {epoch}": (lambda run=run, epoch=epoch: run(shards, epoch))
            for epoch in args.epochs
            for name, run in (("resume", resume), ("replay", replay))
        }
        decodes = {name: count_decodes(run) for name, run in methods.items()}
        times = time_interleaved(methods, steps=1, warmup=1, repeats=args.rounds)
    ms = {name: median(values) for name, values in times.items()}
    rows = [
        [
            epoch,
            ms[f"resume {epoch}"],
            decodes[f"resume {epoch}"],
            ms[f"replay {epoch}"],
            decodes[f"replay {epoch}"],
            max(spread(times[f"resume {epoch}"]), spread(times[f"replay {epoch}"])),
        ]
        for epoch in args.epochs
    ]
    print(format_table(["epochs done", "resume ms", "resume decodes", "replay ms", "replay decodes", "spread"], rows))
    first, last = args.epochs[0], args.epochs[-1]
    payload: dict[str, object] = {
        "environment": environment(),
        "samples_per_epoch": SAMPLES,
        "batch": BATCH,
        "shuffle_buffer": BUFFER,
        "rounds": args.rounds,
        "rows": [dict(zip(COLUMNS, row, strict=False)) for row in rows],  # the spread stays in the table
        "resume_ms_ratio_last_vs_first": ms[f"resume {last}"] / ms[f"resume {first}"],
        "replay_vs_resume_at_last": ms[f"replay {last}"] / ms[f"resume {last}"],
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
