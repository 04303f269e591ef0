"""Atomic file writes — every file the project writes appears whole or not at all — and file hashes.

Writers get a hidden temporary path beside the target (same name at the end, so format-by-suffix writers
such as SimpleITK still work); on success it is flushed to disk, given the usual permissions and renamed
onto the target; on any failure it is removed. A crash mid-write leaves at worst a
`.<pid>-<id>.partial.<name>` file: `remove_stale_partials` clears a folder one process owns (checkpoints),
`remove_abandoned_partials` clears, in a shared output folder, only those whose writer is gone.

The process umask is read, never set: setting it (even to restore it at once) is process-wide, so under
threads (Slicer, DataLoader workers) another thread could create world-writable files in that window.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

PARTIAL_GLOB = ".*.partial.*"
_PARTIAL_NAME = re.compile(r"\.(?:(\d+)-)?[0-9a-f]+\.partial\.(.+)")
#: A partial file whose writer process is gone is left alone this long after its last change, in case the
#: writer runs on another host sharing the folder (its pid means nothing here).
ABANDONED_AFTER_S = 60.0
#: Any partial file untouched this long is abandoned, whoever wrote it.
STALE_AFTER_S = 3600.0


def _current_umask(folder: Path) -> int:
    """The umask without changing it: /proc on Linux, else the mode a fresh probe file gets in `folder`."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    probe = folder / f".{os.getpid()}-{uuid.uuid4().hex[:8]}.partial.umask"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return 0o666 & ~os.fstat(descriptor).st_mode & 0o777
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def _file_mode(folder: Path) -> int:
    """0o666 less the process umask: what `open()` would have given, not mkstemp's owner-only 0o600."""
    return 0o666 & ~_current_umask(folder)


def partial_path(path: str | Path) -> Path:
    """The hidden temporary name used for `path`; it carries the writer's pid so leftovers can be judged."""
    path = Path(path)
    return path.with_name(f".{os.getpid()}-{uuid.uuid4().hex[:8]}.partial.{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only when the block succeeds."""
    path = Path(path)
    temporary = partial_path(path)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(temporary.parent))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def check_writable(folder: str | Path) -> None:
    """Create and remove a probe file in `folder`: raises OSError (read-only, full, no such folder) before
    any heavy work, rather than after it. `os.access` would not do: it is wrong for root and some mounts."""
    folder = Path(folder)
    probe = folder / f".{os.getpid()}-{uuid.uuid4().hex[:8]}.partial.probe"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    os.close(descriptor)
    probe.unlink(missing_ok=True)


def remove_stale_partials(directory: str | Path) -> None:
    """Remove every temporary file in `directory`: only for a folder one process owns (checkpoints)."""
    for stale in Path(directory).glob(PARTIAL_GLOB):
        stale.unlink(missing_ok=True)


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_abandoned_partials(targets: Iterable[str | Path], *, now: float | None = None) -> list[Path]:
    """Remove the temporary files of `targets` (beside each) whose writer is gone; returns what was removed.

    Abandoned: the pid in the name is not running here and the file is untouched for `ABANDONED_AFTER_S`,
    or it is untouched for `STALE_AFTER_S` (a name without a pid counts as a gone writer). Partials of other
    names, and those a live writer is still filling, are left alone, so concurrent runs into one folder
    do not disturb each other.
    """
    now = time.time() if now is None else now
    removed = []
    for target in targets:
        target = Path(target)
        if not target.parent.is_dir():
            continue
        for candidate in target.parent.glob(f".*.partial.{glob_escape(target.name)}"):
            match = _PARTIAL_NAME.fullmatch(candidate.name)
            if match is None or match.group(2) != target.name:
                continue
            try:
                age = now - candidate.stat().st_mtime
            except OSError:
                continue
            gone = match.group(1) is None or not _writer_alive(int(match.group(1)))
            if age >= STALE_AFTER_S or (gone and age >= ABANDONED_AFTER_S):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped, for a literal match in `Path.glob`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks (weights and datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
