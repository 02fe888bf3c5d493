"""WebDataset shards: writing (``jpg`` + ``cls`` tar members, a JSON manifest) and finding them."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path


class DataError(ValueError):
    """Unusable data input; the message is one line naming the culprit."""


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    class_names: list[str] | None = None,
) -> list[Path]:
    """Write ``(key, jpeg_bytes, label)`` samples as ``{prefix}-NNNNNN.tar`` shards plus ``manifest.json``.

    Each shard is written under a temporary name and renamed when complete, so a crash never
    leaves a truncated shard behind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    counts: list[int] = []
    tar: tarfile.TarFile | None = None
    tmp_path = Path()

    def close() -> None:
        assert tar is not None
        tar.close()
        final = out_dir / f"{prefix}-{len(shards):06d}.tar"
        os.replace(tmp_path, final)
        shards.append(final)

    for key, jpeg, label in samples:
        if tar is None or counts[-1] == samples_per_shard:
            if tar is not None:
                close()
            tmp_path = out_dir / f".{prefix}-{len(shards):06d}.tar.tmp"
            tar = tarfile.open(tmp_path, "w")  # noqa: SIM115 (closed by close())
            counts.append(0)
        _add_member(tar, f"{key}.jpg", jpeg)
        _add_member(tar, f"{key}.cls", str(int(label)).encode())
        counts[-1] += 1
    if tar is not None:
        close()
    manifest = {
        "shards": [{"name": p.name, "samples": n} for p, n in zip(shards, counts, strict=True)],
        "samples": sum(counts),
        "class_names": class_names,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return shards


def list_shards(path: str) -> list[str]:
    """The sorted ``.tar`` shards of a folder or a glob; a one-line :class:`DataError` when there are none."""
    if any(ch in path for ch in "*?["):
        shards = sorted(p for p in glob.glob(path) if p.endswith(".tar"))
        if not shards:
            raise DataError(f"data.path: no .tar shards match {path!r}")
        return shards
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path: {path!r} does not exist")
    if p.is_file():
        if p.suffix != ".tar":
            raise DataError(f"data.path: {path!r} is not a .tar shard")
        return [str(p)]
    shards = sorted(str(s) for s in p.glob("*.tar"))
    if not shards:
        raise DataError(f"data.path: folder {path!r} holds no .tar shards")
    return shards


def count_samples(shards: list[str]) -> int:
    """Samples in ``shards``, from a ``manifest.json`` beside them when there is one, else by reading."""
    counts: dict[str, int] = {}
    for folder in {str(Path(s).parent) for s in shards}:
        manifest = Path(folder) / "manifest.json"
        if manifest.is_file():
            for entry in json.loads(manifest.read_text())["shards"]:
                counts[str(Path(folder) / entry["name"])] = entry["samples"]
    total = 0
    for shard in shards:
        if shard not in counts:
            with tarfile.open(shard) as tar:
                names = [Path(m.name) for m in tar.getmembers() if m.isfile()]
                counts[shard] = len({n.parent / n.name.split(".", 1)[0] for n in names})
        total += counts[shard]
    return total
