"""Turn an ImageFolder tree or a list file into WebDataset shards, with DALI index files and a manifest.

    python -m moco_scale.data.make_shards SRC OUT [--shard-size N] [--workers N] [--prefix NAME] [--force]
    python -m moco_scale.data.make_shards --index-only SHARD_OR_FOLDER_OR_GLOB [--check]

SRC is a folder of class folders (``SRC/<class>/**/*.jpg|jpeg|png``; the sorted class names give the
labels 0, 1, ...) or a text file of ``path label`` lines (tab or space separated; relative paths are taken
from the list file's folder; blank lines and ``#`` comments are skipped). Every image is decoded before it
is written, by PIL and, when DALI is installed, by DALI's stricter decoder too (``checked_with`` in the
manifest): JPEGs are stored byte for byte, other formats are re-encoded as JPEG, and files that fail are
skipped and listed under ``bad_samples`` in ``OUT/manifest.json``.

Shard ``i`` holds the images that decode among inputs ``i*N .. i*N+N-1`` (in input order) whatever the
number of workers, so a shard with bad inputs holds fewer than N samples. The manifest records a
fingerprint of the inputs (paths, sizes, mtimes, labels) and the settings: a re-run that matches it is a
no-op, one that does not rewrites OUT, and the shards of another SRC are replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from PIL import Image
from tqdm import tqdm

from moco_scale.data.decode_check import decode_errors, decoders, pil_error
from moco_scale.data.shards import (
    IMAGE_EXTENSIONS,
    DataError,
    excluded_samples,
    list_shards,
    read_manifest,
    split_member,
    tar_samples,
    write_index,
    write_manifest,
    write_shard,
)

IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
JPEG_QUALITY = 95  # for re-encoded non-JPEG inputs
LAYOUT_VERSION = 1  # part of the fingerprint: bump when the output for the same inputs changes

Job = TypeVar("Job")
Result = TypeVar("Result")


class Input(NamedTuple):
    """One image to shard."""

    path: str
    label: int
    key: str


def scan_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """The images under ``root/<class>/`` (sorted; hidden files and folders skipped) with their labels, and
    the sorted class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = (
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        files += [(p, label) for p in sorted(found)]
    return files, classes


def read_list_file(path: Path) -> list[tuple[Path, int]]:
    """The ``(image, label)`` lines of a list file; relative image paths are taken from its folder."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"SRC {str(path)!r} is neither a folder nor a text list file") from e
    files: list[tuple[Path, int]] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{path}:{number}: expected '<image path> <label>', got {line!r}")
        files.append((path.parent / parts[0], int(parts[1])))
    return files


def sample_keys(paths: Sequence[Path]) -> list[str]:
    """Unique sample keys: each file's stem with characters outside ``[A-Za-z0-9_-]`` made ``_``, and
    ``_1``, ``_2``, ... added to repeats."""
    used: set[str] = set()
    repeats: dict[str, int] = {}
    keys: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "image"
        key = stem
        while key in used:
            repeats[stem] = repeats.get(stem, 0) + 1
            key = f"{stem}_{repeats[stem]}"
        used.add(key)
        keys.append(key)
    return keys


def jpeg_payload(path: str) -> bytes:
    """The bytes to store for an image: a JPEG's own bytes, any other format re-encoded as JPEG.

    Raises when the file cannot be read or fully decoded.
    """
    data = Path(path).read_bytes()
    if error := pil_error(data):
        raise ValueError(error)
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return data
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def _write_job(job: tuple[list[Input], str, list[str]]) -> tuple[int, list[dict[str, str]]]:
    """Write one shard from its inputs; returns its sample count and the inputs that failed to decode."""
    inputs, path, with_decoders = job
    errors: dict[str, str] = {}
    payloads: dict[str, bytes] = {}
    for item in inputs:
        try:
            payloads[item.key] = jpeg_payload(item.path)
        except ValueError as e:  # does not decode
            errors[item.key] = str(e)
        except Exception as e:  # cannot be read, or re-encoded: anything a broken file makes PIL raise
            errors[item.key] = f"{type(e).__name__}: {e}"
    stricter = [d for d in with_decoders if d != "pil"]  # jpeg_payload has decoded each one with PIL
    for key, error in zip(payloads, decode_errors(list(payloads.values()), stricter), strict=True):
        if error:
            errors[key] = error
    good = [(item.key, payloads[item.key], item.label) for item in inputs if item.key not in errors]
    return write_shard(good, path), [
        {"path": item.path, "error": errors[item.key]} for item in inputs if item.key in errors
    ]


def _parallel(
    function: Callable[[Job], Result],
    jobs: Sequence[Job],
    weights: Sequence[int],
    unit: str,
    workers: int,
    progress: bool,
) -> list[Result]:
    """``function`` over ``jobs`` (in order) on up to ``workers`` processes; a progress bar counts their weights."""
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(weights), unit=unit, disable=not progress))
        if min(workers, len(jobs)) > 1:
            spawn = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs)), mp_context=spawn))
            mapped = pool.map(function, jobs)
        else:
            mapped = map(function, jobs)
        try:
            for result, weight in zip(mapped, weights, strict=True):
                results.append(result)
                bar.update(weight)
        except BrokenProcessPool:
            raise DataError(
                f"a worker process died (a decoder crash?) after {len(results)} of {len(jobs)} {unit}s; "
                "--workers 1 shows where"
            ) from None
    return results


def _fingerprint(inputs: Sequence[Input], shard_size: int, prefix: str, with_decoders: list[str]) -> str:
    """A digest of the settings, the checking decoders and each input's path, label, key, size and mtime."""
    digest = hashlib.sha256(json.dumps([LAYOUT_VERSION, JPEG_QUALITY, shard_size, prefix, with_decoders]).encode())
    for item in inputs:
        try:
            stat = os.stat(item.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        digest.update(f"{item.path}\t{item.label}\t{item.key}\t{size}\t{mtime}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """OUT's manifest; None without one, ``{}`` when it is unreadable."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        return read_manifest(path)
    except DataError:
        return {}


def _complete(out: Path, manifest: dict[str, Any]) -> bool:
    """Whether every shard the manifest lists is in OUT with its index."""
    shards = [out / s["name"] for s in manifest.get("shards", [])]
    return all(p.is_file() and p.with_suffix(".idx").is_file() for p in shards)


def _remove_stale(out: Path, prefix: str, kept: set[str], old: dict[str, Any] | None) -> None:
    """Delete the shards, index files and temporary files of earlier runs that the new manifest does not list."""
    ours = re.compile(rf"\.?{re.escape(prefix)}-\d{{6}}\.(tar|idx)(\.tmp)?")
    stale = {p.name for p in out.iterdir() if ours.fullmatch(p.name)}
    for shard in (old or {}).get("shards", []):
        name = Path(shard["name"]).name
        stale |= {name, str(Path(name).with_suffix(".idx"))}
    keep = kept | {str(Path(name).with_suffix(".idx")) for name in kept}
    for name in stale - keep:
        (out / name).unlink(missing_ok=True)


def make_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    prefix: str = "shard",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the images of ``src`` (an ImageFolder root or a list file) as shards in ``out``; returns the manifest."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise DataError(f"--prefix {prefix!r}: use only letters, digits, '_', '-' and '.'")
    if not src.exists():
        raise DataError(f"SRC {str(src)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {str(out)!r} exists and is not a folder")
    src = src.resolve()
    if src.is_dir():
        if out.resolve().is_relative_to(src):
            raise DataError(f"OUT {str(out)!r} is inside SRC {str(src)!r}")
        files, class_names = scan_image_folder(src)
        if not files:
            raise DataError(f"SRC {str(src)!r} holds no images (.jpg, .jpeg, .png) in class folders SRC/<class>/")
    else:
        files, class_names = read_list_file(src), None
        if not files:
            raise DataError(f"SRC {str(src)!r} lists no images")
    keys = sample_keys([p for p, _ in files])
    inputs = [Input(str(p), label, key) for (p, label), key in zip(files, keys, strict=True)]
    with_decoders = decoders()
    fingerprint = _fingerprint(inputs, shard_size, prefix, with_decoders)

    old = _read_manifest(out)
    if old is not None and not force:
        if old.get("fingerprint") == fingerprint and _complete(out, old):
            print(f"{out} already holds the shards of {src}; nothing to do (--force rewrites them)")
            return old
        if old.get("source") != str(src):
            raise DataError(
                f"OUT {str(out)!r} holds shards of another source ({old.get('source')}); --force replaces them"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # OUT is incomplete until the new manifest is written

    jobs = [
        (inputs[start : start + shard_size], str(out / f"{prefix}-{i:06d}.tar"), with_decoders)
        for i, start in enumerate(range(0, len(inputs), shard_size))
    ]
    results = _parallel(_write_job, jobs, [len(chunk) for chunk, _, _ in jobs], "img", workers, progress)
    shards = [(Path(path).name, count) for (_, path, _), (count, _) in zip(jobs, results, strict=True) if count]
    bad_samples = [entry for _, bad in results for entry in bad]
    _remove_stale(out, prefix, {name for name, _ in shards}, old)
    manifest = write_manifest(
        out,
        shards,
        class_names,
        bad_samples=bad_samples,
        checked_with=with_decoders,
        source=str(src),
        inputs=len(inputs),
        shard_size=shard_size,
        fingerprint=fingerprint,
    )
    print(f"wrote {manifest['samples']} samples in {len(shards)} shards to {out}; {len(bad_samples)} bad files skipped")
    return manifest


def index_shards(path: str, workers: int = 1, progress: bool = True) -> list[Path]:
    """Write the ``.idx`` beside each shard of a folder, a glob or a single shard, leaving out the samples
    that a shard check listed as bad; returns the index files."""
    shards = list_shards(path)
    jobs = list(excluded_samples(shards).items())
    written = _parallel(_index_job, jobs, [1] * len(shards), "shard", workers, progress)
    return [path for path in written if path is not None]


def _index_job(job: tuple[str, frozenset[str]]) -> Path | None:
    """Index one shard but for its ``excluded`` keys; None for a shard a check found nothing usable in."""
    shard, excluded = job
    kept = [sample for sample in tar_samples(shard) if sample[0] not in excluded]
    if excluded and not kept:
        return None
    return write_index(shard, samples=kept)


def _check_job(job: tuple[str, list[str]]) -> tuple[int, list[dict[str, str]]]:
    """Decode every image of an existing shard and index only the samples that pass; returns how many
    passed and the others as ``{"shard", "key", "error"}``."""
    shard, with_decoders = job
    end = Path(shard).stat().st_size
    errors: dict[str, str] = {}
    images: dict[str, bytes] = {}
    samples = tar_samples(shard, partial_ok=True)
    with open(shard, "rb") as tar:
        for key, members in samples:
            image = next((m for m in members if split_member(m.name)[1] in IMAGE_EXTENSIONS), None)
            if any(m.offset_data + m.size > end for m in members):
                errors[key] = "cut off by the end of the tar"
            elif image is None:
                errors[key] = f"no image member ({', '.join(IMAGE_EXTENSIONS)})"
            else:
                tar.seek(image.offset_data)
                images[key] = tar.read(image.size)
    for key, error in zip(images, decode_errors(list(images.values()), with_decoders), strict=True):
        if error:
            errors[key] = error
    kept = [(key, members) for key, members in samples if key not in errors]
    if kept:
        write_index(shard, samples=kept)
    else:  # listed with 0 samples: the loaders pass over it
        Path(shard).with_suffix(".idx").unlink(missing_ok=True)
    name = Path(shard).name
    return len(kept), [{"shard": name, "key": key, "error": errors[key]} for key, _ in samples if key in errors]


def check_shards(path: str, workers: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Decode-check existing shards (a folder, a glob or one shard): each ``.idx`` lists only the samples
    whose image decodes, and the ``manifest.json`` of each folder records the counts, the samples left
    out (``bad_samples``) and the decoders (``checked_with``); returns the manifests written."""
    shards = list_shards(path)
    with_decoders = decoders()
    results = _parallel(_check_job, [(s, with_decoders) for s in shards], [1] * len(shards), "shard", workers, progress)
    manifests = []
    for folder in sorted({Path(s).parent for s in shards}):
        checked = {Path(s).name: r for s, r in zip(shards, results, strict=True) if Path(s).parent == folder}
        old = _read_manifest(folder) or {}
        others = [e for e in old.get("shards", []) if e["name"] not in checked]
        listed = [(e["name"], e["samples"]) for e in others] + [(n, kept) for n, (kept, _) in checked.items()]
        trusted = set(old.get("checked_with", ())) if others else set(with_decoders)
        replaced = {"shards", "samples", "class_names", "checked_with", "decode_checked"}  # the last: older manifests
        kept_extra = {k: v for k, v in old.items() if k not in replaced}
        kept_extra["bad_samples"] = [e for e in old.get("bad_samples", []) if e.get("shard") not in checked] + [
            entry for _, bad in checked.values() for entry in bad
        ]
        manifests.append(
            write_manifest(
                folder,
                sorted(listed),
                old.get("class_names"),
                checked_with=[d for d in with_decoders if d in trusted],
                **kept_extra,
            )
        )
    return manifests


def _positive(text: str) -> int:
    """argparse type: an integer > 0."""
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 for unusable input)."""
    parser = argparse.ArgumentParser(
        prog="python -m moco_scale.data.make_shards",
        description="Write an ImageFolder tree or a 'path label' list file as WebDataset shards (jpg + cls), "
        "with a DALI .idx beside each shard and OUT/manifest.json.",
    )
    parser.add_argument("src", nargs="?", metavar="SRC", help="ImageFolder root (SRC/<class>/*.jpg) or list file")
    parser.add_argument("out", nargs="?", metavar="OUT", help="folder for the shards, .idx files and manifest.json")
    parser.add_argument("--shard-size", type=_positive, default=1000, metavar="N", help="images per shard")
    parser.add_argument(
        "--workers", type=_positive, default=min(4, os.cpu_count() or 1), metavar="N", help="writer processes"
    )
    parser.add_argument("--prefix", default="shard", metavar="NAME", help="shard names: NAME-000000.tar, ...")
    parser.add_argument("--force", action="store_true", help="rewrite OUT even when its manifest is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--index-only", metavar="SHARDS", help="only write the .idx of existing shards: a shard, a folder or a glob"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --index-only: decode every image first; index only those that decode and record the rest "
        "in each folder's manifest.json (what lets DALI stream the shards)",
    )
    args = parser.parse_args(argv)
    if args.check and not args.index_only:
        parser.error("--check goes with --index-only (SRC is always checked)")
    if args.index_only and (args.src or args.out):
        parser.error("--index-only takes no SRC or OUT")
    if not args.index_only and not (args.src and args.out):
        parser.error("SRC and OUT are required (or --index-only SHARDS)")
    try:
        if args.index_only and args.check:
            manifests = check_shards(args.index_only, args.workers, not args.no_progress)
            kept = sum(m["samples"] for m in manifests)
            left_out = sum("shard" in e for m in manifests for e in m["bad_samples"])
            print(f"indexed {kept} samples that decode; {left_out} left out (bad_samples in manifest.json)")
        elif args.index_only:
            written = index_shards(args.index_only, args.workers, not args.no_progress)
            print(f"wrote {len(written)} index files")
        else:
            make_shards(
                args.src,
                args.out,
                shard_size=args.shard_size,
                workers=args.workers,
                prefix=args.prefix,
                force=args.force,
                progress=not args.no_progress,
            )
    except DataError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
