"""What the shard check costs per image: PIL alone, the JPEG structure walk, and PIL + DALI's decoder.

The shard writer and ``make_shards --index-only --check`` decode every image with PIL and, when DALI is
installed, walk its JPEG markers and decode it again with DALI's CPU decoder
(``moco_scale.data.decode_check.decode_errors``). This times those steps on one process over realistic
photos (crops of scikit-learn's sample photos at 400x300, as in ``data_throughput.py``), interleaved
over rounds, and reports milliseconds per image (median of the rounds) and the ratio of the full
check to PIL alone.

    python benchmarks/shard_check.py --json /tmp/shard_check.json
"""

from __future__ import annotations

import argparse

try:
    from benchmarks._common import environment, format_table, median, spread, time_interleaved, write_json
    from benchmarks.data_throughput import make_photos
except ModuleNotFoundError:  # run as ``python benchmarks/shard_check.py``: the script's folder is on sys.path
    from _common import environment, format_table, median, spread, time_interleaved, write_json
    from data_throughput import make_photos

from moco_scale.data.decode_check import decode_errors, decoders, jpeg_structure_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs checked per call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="16 images, 1 round: for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.rounds = 16, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    payloads = [jpeg for _, jpeg, _ in make_photos(args.images)[0]]
    methods = {
        "pil": lambda: decode_errors(payloads, ["pil"]),
        "structure": lambda: [jpeg_structure_error(p) for p in payloads],
    }
    if "dali" in decoders():
        methods["pil+dali"] = lambda: decode_errors(payloads, ["pil", "dali"])
    for name, check in methods.items():  # every photo passes every check
        assert not any(check()), name
    times = time_interleaved(methods, steps=1, warmup=1, repeats=args.rounds)
    per_image = {name: median(ms) / len(payloads) for name, ms in times.items()}
    rows = [[name, per_image[name], spread(times[name])] for name in methods]
    print(format_table(["check", "ms per image", "spread"], rows))
    payload: dict[str, object] = {
        "environment": environment(),
        "images": len(payloads),
        "rounds": args.rounds,
        "ms_per_image": per_image,
        "ratio_full_vs_pil": per_image.get("pil+dali", per_image["pil"]) / per_image["pil"],
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
