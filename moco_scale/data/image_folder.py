"""ImageFolder trees and ``path label`` lists, read in place: no conversion to shards first.

``data.path`` may name
- an ImageFolder root: one folder per class, its images anywhere below it. Classes are the folder names
  in sorted order (label = place in that order), images are sorted by path;
- a list file: a line ``<path> <label>`` per image, the path relative to the list's folder (or absolute),
  in the order the loaders index. A line starting with ``#`` is a comment, but for the check's records:
  ``# checked_with: pil dali`` and ``# bad: <path>: <error>``.

The index (paths and labels, in order) is cut into parts of :data:`PART_SIZE` images, which the loaders
split, shuffle and resume as they do shards (:mod:`moco_scale.data.sources`). A file that cannot be read
or decoded is a bad sample, counted and skipped like a corrupt shard member.

DALI stops on an image it cannot decode, so it reads a folder only through a checked list:

    python -m moco_scale.data.image_folder ROOT --out ROOT.checked.txt

decodes every image with PIL and DALI's CPU decoder, and writes the list of those that pass, with the
others as ``# bad:`` lines (counted in ``bad_samples``). Listing a tree once is also what keeps a network
file system from being walked again at every start; see the README on when to convert to shards instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moco_scale.data.shards import IMAGE_EXTENSIONS, DataError

PART_SIZE = 1000  # images per part: the unit of the epoch's shuffled order, as a shard is
CHECKED = "# checked_with:"
BAD = "# bad:"


@dataclass
class FolderIndex:
    """The images of a folder or list, in index order: their paths (absolute) and labels."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] | None = None
    checked_with: set[str] = field(default_factory=set)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left out by a check


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def scan_folder(root: Path) -> FolderIndex:
    """The index of an ImageFolder tree (see the module docstring); a one-line :class:`DataError` without images."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            os.path.join(folder, file)
            for folder, _, files in os.walk(root / name, followlinks=True)
            for file in files
            if _is_image(file)
        )
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return FolderIndex(paths, labels, classes)


def read_list(path: Path) -> FolderIndex:
    """The index of a ``path label`` list file; a one-line :class:`DataError` naming the first bad line."""
    index = FolderIndex([], [])
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if line.startswith(CHECKED):
                index.checked_with = set(line.removeprefix(CHECKED).split())
            elif line.startswith(BAD):
                bad_path, _, why = line.removeprefix(BAD).strip().partition(": ")
                index.bad.append((bad_path, why))
            elif line.strip() and not line.startswith("#"):
                file, _, label = line.rstrip().rpartition(" ")
                if not file or not label.lstrip("-").isdigit():
                    raise DataError(f"{path}:{number}: expected '<path> <label>', got {line!r}")
                index.paths.append(str(path.parent / file.strip()))
                index.labels.append(int(label))
    if not index.paths:
        raise DataError(f"{path}: lists no images")
    return index


def write_list(index: FolderIndex, path: Path) -> None:
    """Write ``index`` as a list file (paths relative to its folder where they lie under it), atomically."""
    base = path.parent.resolve()

    def relative(file: str) -> str:
        resolved = Path(file).resolve()
        return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(resolved)

    lines = [f"{CHECKED} {' '.join(sorted(index.checked_with))}"] if index.checked_with else []
    lines += [f"{BAD} {relative(file)}: {why}" for file, why in index.bad]
    lines += [f"{relative(file)} {label}" for file, label in zip(index.paths, index.labels, strict=True)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def read_index(path: str) -> FolderIndex:
    """The index of a folder or a list file, read once per process: the backend's choice, the sample count, the
    loaders and the evaluation passes all open it, and walking a large tree takes minutes on a network file
    system (the files added to a tree after the start are not seen until the next one). Not to be changed."""
    p = Path(path)
    return scan_folder(p) if p.is_dir() else read_list(p)


class FolderSource:
    """A folder's or list's images as parts of :data:`PART_SIZE` (see :mod:`moco_scale.data.sources`)."""

    def __init__(self, path: str):
        self.inputs = [path]
        self.index = read_index(path)
        total = len(self.index.paths)
        self.starts = {f"{path}#{k:06d}": first for k, first in enumerate(range(0, total, PART_SIZE))}
        self.sizes = {part: min(PART_SIZE, total - first) for part, first in self.starts.items()}
        self.left_out = len(self.index.bad)
        self.checked_with = self.index.checked_with
        self.class_names = self.index.class_names
        self.num_classes = len(self.class_names) if self.class_names else max(self.index.labels) + 1

    def read(self, part: str, first: int) -> Iterator[dict | None]:
        """Each image's file bytes as a webdataset-like sample; one that cannot be read has no image (bad)."""
        start = self.starts[part]
        for i in range(start + first, start + self.sizes[part]):
            file = self.index.paths[i]
            sample = {"__key__": file, "cls": str(self.index.labels[i])}
            try:
                with open(file, "rb") as f:
                    sample["jpg"] = f.read()  # the member name only says "an image": PIL reads the format
            except OSError:
                pass
            yield sample
        yield from itertools.repeat(None)


def check_folder(path: str, out: Path, chunk: int = 256) -> FolderIndex:
    """Decode every image of a folder or list with PIL and (when installed) DALI's CPU decoder, and write the
    list of those that pass to ``out``, with the others as ``# bad:`` lines; returns the checked index."""
    from tqdm import tqdm

    from moco_scale.data.decode_check import decode_errors, decoders

    index, used = read_index(path), decoders()
    checked = FolderIndex([], [], index.class_names, set(used), list(index.bad))
    pairs = list(zip(index.paths, index.labels, strict=True))
    with tqdm(total=len(pairs), unit="img", desc=f"checking {path}") as progress:
        for start in range(0, len(pairs), chunk):
            batch = pairs[start : start + chunk]
            payloads, unreadable = [], {}
            for file, _ in batch:
                try:
                    payloads.append(Path(file).read_bytes())
                except OSError as e:
                    payloads.append(b"")
                    unreadable[file] = f"unreadable ({e.strerror})"
            for (file, label), error in zip(batch, decode_errors(payloads, used), strict=True):
                if error is None:
                    checked.paths.append(file)
                    checked.labels.append(label)
                else:
                    checked.bad.append((file, unreadable.get(file, error)))
            progress.update(len(batch))
    write_list(checked, out)
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="an ImageFolder root or a 'path label' list file")
    parser.add_argument("--out", type=Path, required=True, help="the checked list file to write")
    args = parser.parse_args(argv)
    try:
        checked = check_folder(args.path, args.out)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(
        f"{args.out}: {len(checked.paths)} images pass {' and '.join(sorted(checked.checked_with))}, "
        f"{len(checked.bad)} left out"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
