"""WebDataset shards: writing (``jpg`` + ``cls`` tar members, DALI ``.idx`` files, a JSON manifest) and finding them."""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moco_scale.data.augment import ViewSpec

INDEX_VERSION = "v1.2"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # a sample's image member: first found


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's stream of two-view batches reads, and in which order: the input (shards, or one ImageFolder
    root or list file: :func:`~moco_scale.data.sources.list_inputs`), the two views, the batch per rank, this rank
    among ``world_size``, the shuffle's seed and buffer. Both loaders take it."""

    inputs: list[str]
    views: tuple[ViewSpec, ViewSpec]
    batch_size: int  # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000


class DataError(ValueError):
    """Unusable data input; the message is one line naming the culprit."""


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(payload))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member, split at the first dot of its file name; None without one."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot <= start:  # no extension, or a hidden file
        return None
    return name[:dot], name[dot + 1 :]


TarSample = tuple[str, list[tarfile.TarInfo]]  # a key and its members, in stored order


def tar_samples(tar_path: str | Path, partial_ok: bool = False) -> list[TarSample]:
    """The samples of a shard: consecutive regular members with the same key (see :func:`split_member`).

    A tar that cannot be read is a :class:`DataError`; with ``partial_ok`` a tar whose tail is damaged
    yields the samples read before it (a member's data may then run past the end of the file).
    """
    samples: list[TarSample] = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                split = split_member(member.name) if member.isreg() else None
                if split is None:
                    continue
                if any(ch.isspace() for ch in member.name):
                    raise DataError(
                        f"{tar_path}: member {member.name!r} has white space, which a DALI index cannot hold"
                    )
                if not samples or samples[-1][0] != split[0]:
                    samples.append((split[0], []))
                samples[-1][1].append(member)
    except (OSError, tarfile.TarError) as e:
        if not (partial_ok and samples):
            raise DataError(f"{tar_path}: not a readable uncompressed tar ({e})") from e
    return samples


def write_index(
    tar_path: str | Path, index_path: str | Path | None = None, samples: list[TarSample] | None = None
) -> Path:
    """Write the DALI index of a shard (``X.idx`` beside ``X.tar`` unless ``index_path``); returns its path.

    The format is ``wds2idx``'s v1.2, which ``fn.readers.webdataset(index_paths=...)`` reads: a line
    ``v1.2 <samples>``, then a line per sample with ``<ext> <offset> <size> <member name>`` for each of
    its members, where offset is that of the member's data from the start of the tar. ``samples``
    (default: all of :func:`tar_samples`) are the ones DALI will read.
    """
    tar_path = Path(tar_path)
    index_path = Path(index_path) if index_path is not None else tar_path.with_suffix(".idx")
    samples = tar_samples(tar_path) if samples is None else samples
    if not samples:
        raise DataError(f"{tar_path}: holds no samples to index")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for _, members in samples:
        lines.append(" ".join(f"{split_member(m.name)[1]} {m.offset_data} {m.size} {m.name}" for m in members))
    _write_atomically(index_path, "\n".join(lines) + "\n")
    return index_path


def write_shard(samples: Iterable[tuple[str, bytes, int]], path: str | Path) -> int:
    """Write ``(key, jpeg_bytes, label)`` samples as one shard at ``path`` plus its ``.idx``; returns their number.

    The shard is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated shard behind. With no samples nothing is written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tarfile.open(tmp, "w") as tar:
            for key, jpeg, label in samples:
                _add_member(tar, f"{key}.jpg", jpeg)
                _add_member(tar, f"{key}.cls", str(int(label)).encode())
                count += 1
        if count:
            write_index(tmp, path.with_suffix(".idx"))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def write_manifest(
    out_dir: str | Path, shards: list[tuple[str, int]], class_names: list[str] | None, **extra: object
) -> dict[str, Any]:
    """Write ``manifest.json``: the ``(name, samples)`` of each shard with its size in bytes now (the loaders
    refuse a shard whose size changed since), their total, the class names and ``extra``; returns it."""
    out_dir = Path(out_dir)
    manifest = {
        "shards": [{"name": name, "samples": n, "bytes": (out_dir / name).stat().st_size} for name, n in shards],
        "samples": sum(n for _, n in shards),
        "class_names": class_names,
        **extra,
    }
    _write_atomically(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    class_names: list[str] | None = None,
    check: bool = False,
) -> list[Path]:
    """Write ``(key, jpeg_bytes, label)`` samples as ``{prefix}-NNNNNN.tar`` shards plus ``manifest.json``.

    Each shard gets its ``.idx`` and is written atomically (see :func:`write_shard`). With ``check``,
    every image is decoded first (:func:`~moco_scale.data.decode_check.decode_errors`): those that fail are
    left out and listed under ``bad_samples``, and the manifest's ``checked_with`` names the decoders.
    """
    from moco_scale.data.decode_check import decode_errors, decoders

    with_decoders = decoders() if check else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = iter(samples)
    written: list[tuple[Path, int]] = []
    bad: list[dict[str, str]] = []
    while chunk := list(itertools.islice(stream, samples_per_shard)):
        errors = decode_errors([jpeg for _, jpeg, _ in chunk], with_decoders) if check else [None] * len(chunk)
        bad += [{"key": key, "error": error} for (key, _, _), error in zip(chunk, errors, strict=True) if error]
        path = out_dir / f"{prefix}-{len(written):06d}.tar"
        good = [sample for sample, error in zip(chunk, errors, strict=True) if error is None]
        if count := write_shard(good, path):
            written.append((path, count))
    write_manifest(out_dir, [(p.name, n) for p, n in written], class_names, checked_with=with_decoders, bad_samples=bad)
    return [p for p, _ in written]


def _reindex(folder: Path) -> str:
    """What to run to index ``folder`` afresh (a plain ``--index-only`` keeps the manifest as it is)."""
    return f"re-index the folder: python -m moco_scale.data.make_shards --index-only {folder} --check"


def read_manifest(path: Path) -> dict[str, Any]:
    """A ``manifest.json``; a one-line :class:`DataError` when it is not one that :func:`write_manifest` writes."""
    try:
        content = json.loads(path.read_text())
        if not all(isinstance(e["name"], str) and isinstance(e["samples"], int) for e in content["shards"]):
            raise TypeError("a shard entry without a name or a sample count")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); {_reindex(path.parent)}") from e
    return content


def _indexed_samples(shard: Path) -> int | None:
    """The sample count on the first line of the shard's ``.idx``; None without a readable one."""
    try:
        with open(shard.with_suffix(".idx")) as index:
            _, count = index.readline().split()
        return int(count)
    except (OSError, ValueError):
        return None


def _check_unchanged(shard: Path, entry: dict[str, Any]) -> None:
    """A one-line :class:`DataError` when ``shard`` is not what its manifest entry recorded: its size in bytes,
    or (older manifests, without the size) the sample count of its ``.idx``."""
    if "bytes" in entry:
        size = shard.stat().st_size
        problem = f"is {size} bytes, but manifest.json recorded {entry['bytes']}" if size != entry["bytes"] else ""
    else:
        indexed = _indexed_samples(shard)
        mismatch = indexed not in (None, entry["samples"])
        problem = f"has {indexed} samples in its .idx, but manifest.json lists {entry['samples']}" if mismatch else ""
    if problem:
        raise DataError(f"{shard} {problem}: it changed after it was indexed; {_reindex(shard.parent)}")


def manifests_of(shards: list[str]) -> dict[Path, dict[str, Any]]:
    """The ``manifest.json`` beside the shards, by folder (folders without one are left out), after checking that
    each of ``shards`` it lists is unchanged since (:func:`_check_unchanged`)."""
    found = {}
    for folder in {Path(s).parent for s in shards}:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            found[folder] = read_manifest(manifest)
    wanted = {Path(s) for s in shards}
    for folder, content in found.items():
        for entry in content["shards"]:
            if folder / entry["name"] in wanted:
                _check_unchanged(folder / entry["name"], entry)
    return found


def checked_with(shards: list[str]) -> set[str]:
    """The decoders that every image of every shard was checked with (``pil``, ``dali``), from the manifests."""
    by_shard: dict[str, set[str]] = {}
    for folder, content in manifests_of(shards).items():
        for entry in content["shards"]:
            by_shard[str(folder / entry["name"])] = set(content.get("checked_with", ()))
    found = [by_shard.get(str(Path(s)), set()) for s in shards]
    return set.intersection(*found) if found else set()


def usable_shards(shards: list[str]) -> list[str]:
    """``shards`` but those that a manifest lists with no sample (a shard check found none that decodes)."""
    empty = {
        str(folder / entry["name"])
        for folder, content in manifests_of(shards).items()
        for entry in content["shards"]
        if entry["samples"] == 0
    }
    usable = [s for s in shards if str(Path(s)) not in empty]
    if not usable:
        raise DataError(f"no shard of {shards[0]}... holds a sample that decodes (see bad_samples in manifest.json)")
    return usable


def excluded_samples(shards: list[str]) -> dict[str, frozenset[str]]:
    """The keys a shard check left out of each shard's index (``bad_samples`` with a ``shard``), by shard."""
    excluded: dict[str, set[str]] = {}
    for folder, content in manifests_of(shards).items():
        for entry in content.get("bad_samples", ()):
            if "shard" in entry:
                excluded.setdefault(str(folder / entry["shard"]), set()).add(entry["key"])
    return {s: frozenset(excluded.get(str(Path(s)), ())) for s in shards}


def list_shards(path: str, name: str = "data.path") -> list[str]:
    """The sorted ``.tar`` shards of a folder or a glob; a one-line :class:`DataError` naming the setting
    ``name`` when there are none."""
    if any(ch in path for ch in "*?["):
        shards = sorted(p for p in glob.glob(path) if p.endswith(".tar"))
        if not shards:
            raise DataError(f"{name}: no .tar shards match {path!r}")
        return shards
    p = Path(path)
    if not p.exists():
        raise DataError(f"{name}: {path!r} does not exist")
    if p.is_file():
        if p.suffix != ".tar":
            raise DataError(f"{name}: {path!r} is not a .tar shard")
        return [str(p)]
    shards = sorted(str(s) for s in p.glob("*.tar"))
    if not shards:
        raise DataError(f"{name}: folder {path!r} holds no .tar shards")
    return shards


def shard_sizes(shards: list[str]) -> dict[str, int]:
    """Samples in each shard, from a ``manifest.json`` beside it when there is one, else by reading the tar."""
    listed = {
        str(folder / entry["name"]): entry["samples"]
        for folder, content in manifests_of(shards).items()
        for entry in content["shards"]
    }
    sizes = {}
    for shard in shards:
        if str(Path(shard)) in listed:
            sizes[shard] = listed[str(Path(shard))]
        else:
            with tarfile.open(shard) as tar:
                names = [Path(m.name) for m in tar.getmembers() if m.isfile()]
                sizes[shard] = len({n.parent / n.name.split(".", 1)[0] for n in names})
    return sizes
