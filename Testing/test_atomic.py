"""Atomic writes: whole files or none, nothing left behind, ordinary permissions."""

import os
from pathlib import Path

import pytest

from RadiogenomicGANLib.atomic import PARTIAL_GLOB, atomic_path, remove_stale_partials, write_bytes_atomic


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
