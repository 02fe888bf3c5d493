"""Durable file writes: a file is either its old self or wholly the new one, and stays so after a crash.

A writer fills a temporary file beside the target, flushes it to the disk (``fsync``), renames it over
the target (``os.replace``, atomic within a folder) and flushes the folder, which holds the rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# What fsync of a folder raises where a file system cannot flush folders (some network and FUSE ones):
# nothing more can be done there, and the file data itself was flushed.
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES}


def fsync_file(path: str | Path) -> None:
    """Flush one file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (creations, renames, deletions in it) to the disk, where the file system can."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving without an error it is flushed and
    renamed over ``path``, and the folder is flushed. On an error it is removed and ``path`` is untouched."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Replace ``path``'s contents with ``data`` (text as UTF-8) so that a crash leaves the old or the new."""
    with replacing(path) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)
