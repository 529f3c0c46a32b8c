"""Files that appear whole or not at all: the one atomic-write helper every layer uses.

A file is written under a temporary name beside its destination, synced, given its
permissions, and renamed over the destination; the folder is then synced so that
the rename itself survives a crash. A failure (an exception, a full disk, Ctrl-C)
removes the temporary file and leaves the destination as it was, so a reader never
sees half a result, a torn cache entry or a truncated model.

`atomic_path` hands out the temporary path, for writers that want a path (safetensors,
GGUF, pickle); `atomic_file` opens it for writing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _fsync(path: Path, folder: bool = False) -> None:
    """Sync a file's data, or a folder's entries (a rename inside it). Some file systems
    refuse fsync on a folder; the rename is atomic all the same, so that is let pass."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest, mode: int = 0o644):
    """A temporary path beside `dest`; once the block ends without an exception, what
    was written there is synced, chmod'ed to `mode` and renamed to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        _fsync(dest.parent, folder=True)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(dest, mode: int = 0o644):
    """A binary file object whose contents become `dest` (as atomic_path does)."""
    with atomic_path(dest, mode) as tmp, open(tmp, "wb") as f:
        yield f
