"""Where a loader's samples come from: WebDataset shards, or an ImageFolder tree or ``path label`` list
(:mod:`moco_scale.data.image_folder`), seen alike as named parts of known size.

A part is a shard, or a run of :data:`~moco_scale.data.image_folder.PART_SIZE` files of a folder's index. The
loaders split, shuffle and resume over parts and places in them, so the same exactly-once split across ranks,
order per (seed, epoch), bad-sample counting and exact resume hold for both kinds of input.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator
from functools import cached_property
from pathlib import Path
from typing import Protocol

import webdataset as wds

from moco_scale.data.shards import DataError, checked_with, excluded_samples, list_shards, manifests_of, shard_sizes

Sample = dict | None  # a raw sample (webdataset's dict of members); None for a place its part does not hold


class Source(Protocol):
    """Samples as parts of known size."""

    inputs: list[str]  # what ``data.path`` resolved to: the shards, or the one folder or list
    sizes: dict[str, int]  # samples per part, by part name
    left_out: int  # samples a decode check left out of the parts (counted as bad)
    checked_with: set[str]  # the decoders every sample of every part was checked with
    class_names: list[str] | None
    num_classes: int | None  # of the class names, else of the labels found (largest + 1), else None

    def read(self, part: str, first: int) -> Iterator[Sample]:
        """The samples of ``part`` from place ``first`` on, in stored order, then None without end."""
        ...


def read_shard(shard: str, skip: Collection[str] = ()) -> wds.WebDataset:
    """The samples of one shard in stored order, but for the keys in ``skip``; this process reads all of
    it (the caller splits the work), and a truncated tar or an unreadable member is skipped with a
    warning, not raised."""
    samples = wds.WebDataset(
        [shard],
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
        handler=wds.warn_and_continue,
    )
    return samples.select(lambda sample: sample["__key__"] not in skip) if skip else samples


class ShardSource:
    """WebDataset shards; a shard is a part. A manifest beside them, when there is one, gives the sizes, the
    decoders they were checked with, the keys the check left out, and the class names. Each is read when first
    asked for: the backend's choice reads only the manifests, not the tars."""

    def __init__(self, shards: list[str]):
        self.inputs = shards

    @cached_property
    def sizes(self) -> dict[str, int]:
        return shard_sizes(self.inputs)

    @cached_property
    def excluded(self) -> dict[str, frozenset[str]]:
        """The keys a shard check left out of each shard's index (the torch loader skips them too)."""
        return excluded_samples(self.inputs)

    @property
    def left_out(self) -> int:
        return sum(map(len, self.excluded.values()))

    @cached_property
    def checked_with(self) -> set[str]:
        return checked_with(self.inputs)

    @cached_property
    def class_names(self) -> list[str] | None:
        names = {tuple(n) for content in manifests_of(self.inputs).values() if (n := content.get("class_names"))}
        if len(names) > 1:
            raise DataError(f"the manifests of {self.inputs[0]}... list different class names")
        return list(names.pop()) if names else None

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def read(self, part: str, first: int) -> Iterator[Sample]:
        samples = itertools.chain(read_shard(part, self.excluded[part]), itertools.repeat(None))
        return itertools.islice(samples, first, None)


def is_folder(inputs: list[str]) -> bool:
    """Whether ``inputs`` (from :func:`list_inputs`) is one ImageFolder root or list file, not shards."""
    return len(inputs) == 1 and not inputs[0].endswith(".tar")


def open_source(inputs: list[str]) -> Source:
    """The source of ``inputs`` (from :func:`list_inputs`)."""
    from moco_scale.data.image_folder import FolderSource

    return FolderSource(inputs[0]) if is_folder(inputs) else ShardSource(inputs)


def count_samples(inputs: list[str]) -> int:
    """Samples in ``inputs`` (from :func:`list_inputs`): a shard's count from the ``manifest.json`` beside it
    when there is one, else by reading the tar; a folder's or list's images."""
    return sum(open_source(inputs).sizes.values())


def list_inputs(path: str, name: str = "data.path") -> list[str]:
    """What ``path`` names, as a loader takes it: the ``.tar`` shards of a folder or a glob (or one shard), or
    ``[path]`` for an ImageFolder root (class folders of images, no shards) or a ``path label`` list file; a
    one-line :class:`DataError` naming the setting ``name`` when it is none of these."""
    p = Path(path)
    if any(ch in path for ch in "*?[") or p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return list_shards(path, name)
    if not p.exists():
        raise DataError(f"{name}: {path!r} does not exist")
    if p.is_dir() and not any(child.is_dir() for child in p.iterdir()):
        raise DataError(f"{name}: folder {path!r} holds neither .tar shards nor class folders of images")
    return [path]
