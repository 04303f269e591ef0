"""Atomic file writes — every file the project writes appears whole or not at all — and file hashes.

Writers get a hidden temporary path beside the target (same name at the end, so format-by-suffix writers
such as SimpleITK still work); on success it is flushed to disk, given the usual permissions and renamed
onto the target; on any failure it is removed. A crash mid-write leaves at worst a `.<id>.partial.<name>`
file, which `remove_stale_partials` clears.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

PARTIAL_GLOB = ".*.partial.*"


def _file_mode() -> int:
    """0o666 less the process umask: what `open()` would have given, not mkstemp's owner-only 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def partial_path(path: str | Path) -> Path:
    """The hidden temporary name used for `path`."""
    path = Path(path)
    return path.with_name(f".{uuid.uuid4().hex[:8]}.partial.{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only when the block succeeds."""
    path = Path(path)
    temporary = partial_path(path)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def remove_stale_partials(directory: str | Path) -> None:
    """Remove temporary files a crashed writer left in `directory`."""
    for stale in Path(directory).glob(PARTIAL_GLOB):
        stale.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks (weights and datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
