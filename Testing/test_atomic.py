"""Atomic writes: whole files or none, nothing left behind, ordinary permissions."""

import os
from pathlib import Path

import pytest

from RadiogenomicGANLib.atomic import (
    ABANDONED_AFTER_S,
    PARTIAL_GLOB,
    STALE_AFTER_S,
    atomic_path,
    check_writable,
    partial_path,
    remove_abandoned_partials,
    remove_stale_partials,
    write_bytes_atomic,
)


def test_success_renames_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "weights.json"
    old = os.umask(0o022)
    try:
        write_bytes_atomic(target, b"{}")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"{}"
    assert target.stat().st_mode & 0o777 == 0o644, "not mkstemp's owner-only 0o600"
    assert not list(tmp_path.glob(PARTIAL_GLOB))


def test_failure_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "volume.nrrd"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        assert temporary.name.endswith(".volume.nrrd") and temporary.parent == tmp_path
        temporary.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(PARTIAL_GLOB))


def test_stale_partials_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".abcd1234.partial.ckpt-1.safetensors").write_bytes(b"crash")
    (tmp_path / "keep.txt").write_bytes(b"x")
    remove_stale_partials(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_umask_is_read_never_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask, even to restore it, is process-wide: another thread could create world-writable
    files in that window. So a write must never call os.umask, and still give the umask's permissions."""
    old = os.umask(0o027)
    try:
        def forbidden(mask: int) -> int:
            raise AssertionError("os.umask called during an atomic write")

        monkeypatch.setattr(os, "umask", forbidden)
        write_bytes_atomic(tmp_path / "a.json", b"{}")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_abandoned_partials_of_the_outputs_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    target = tmp_path / "new.nrrd"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    killed = tmp_path / f".{dead_pid}-abcd1234.partial.new.nrrd"       # a killed insert's leftover
    legacy = tmp_path / ".abcd1234.partial.new.nrrd"                    # written before pids were in the name
    running = partial_path(target)                                       # this (live) process is writing it
    fresh = tmp_path / f".{dead_pid}-ffff0000.partial.new.nrrd"         # just touched: maybe another host's
    other = tmp_path / f".{dead_pid}-abcd1234.partial.other.nrrd"       # another output's: not ours to judge
    for path in (killed, legacy, running, fresh, other):
        path.write_bytes(b"half")
    old = time.time() - 2 * ABANDONED_AFTER_S
    for path in (killed, legacy, running, other):
        os.utime(path, (old, old))
    removed = remove_abandoned_partials([target])
    assert sorted(removed) == sorted([killed, legacy])
    assert running.exists() and fresh.exists() and other.exists()
    very_old = time.time() - 2 * STALE_AFTER_S
    os.utime(running, (very_old, very_old))
    assert remove_abandoned_partials([target]) == [running], "untouched for an hour: abandoned, whoever wrote it"


def test_check_writable_raises_before_work(tmp_path: Path) -> None:
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        check_writable(tmp_path / "missing")
