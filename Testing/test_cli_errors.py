"""One exit-code convention across every command line (issue 11): a user error exits 2 with one line on
stderr, `error: ...`, never a traceback; nothing is written under a requested name; no input is changed.

The insert command's own table is in test_cli_insert.py and export's in test_train_export.py; these are the
cases that once printed tracebacks or overwrote an input in the other entry points.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _call(main: Callable[[list[str]], object], argv: list[str]) -> int:
    """Exit status of a CLI's main, whether it returns it or raises SystemExit (training.train)."""
    try:
        result = main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return result if isinstance(result, int) else 0


def _phantom(argv: list[str]) -> object:
    from RadiogenomicGANLib.phantom.__main__ import main

    return main(argv)


def _demo(argv: list[str]) -> object:
    from RadiogenomicGANLib.demo import main

    return main(argv)


def _prepare(argv: list[str]) -> object:
    from training.prepare import main

    return main(argv)


def _train(argv: list[str]) -> object:
    from training.train import main

    return main(argv)


def _evaluate(argv: list[str]) -> object:
    from training.evaluate import main

    return main(argv)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("phantom_out_is_a_file", "is a file"),
        ("demo_out_is_a_file", "is a file"),
        ("train_out_is_a_file", "is a file"),
        ("evaluate_out_is_a_file", "is a file"),
        ("prepare_out_is_the_rnaseq_table", "is an input"),
        ("prepare_out_inside_the_cohort", "inside the input folder"),
        ("prepare_out_in_a_missing_folder", "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                          message: str) -> None:
    inputs = tmp_path / "inputs"
    cohort = inputs / "cohort"
    cohort.mkdir(parents=True)
    (cohort / "1-001.dcm").write_bytes(b"a DICOM slice")
    rnaseq = inputs / "GSE103584_R01_NSCLC_RNAseq.txt"
    rnaseq.write_text("\tR01-001\nEGFR\t1.5\n")
    a_file = inputs / "notes.txt"
    a_file.write_text("keep me")
    data = inputs / "data.npz"
    data.write_bytes(b"not read")
    weights = inputs / "w.safetensors"
    weights.write_bytes(b"not read")
    prepare = ["--cohort", str(cohort), "--rnaseq", str(rnaseq), "--quiet"]
    main, argv = {
        "phantom_out_is_a_file": (_phantom, ["--out", str(a_file), "--patients", "1", "--quiet"]),
        "demo_out_is_a_file": (_demo, ["--out", str(a_file)]),
        "train_out_is_a_file": (_train, ["--data", str(data), "--out", str(a_file), "--steps", "1"]),
        "evaluate_out_is_a_file": (_evaluate, ["--data", str(data), "--weights", str(weights), "--out", str(a_file)]),
        "prepare_out_is_the_rnaseq_table": (_prepare, [*prepare, "--out", str(rnaseq)]),
        "prepare_out_inside_the_cohort": (_prepare, [*prepare, "--out", str(cohort / "data.npz")]),
        "prepare_out_in_a_missing_folder": (_prepare, [*prepare, "--out", str(tmp_path / "nowhere" / "d.npz")]),
    }[case]
    before = _snapshot(tmp_path)
    assert _call(main, argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error, error
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert _snapshot(tmp_path) == before, "an input changed or an output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_full_disk_is_a_user_error_not_a_traceback(tmp_path: Path) -> None:
    """The phantom writer under a 4 KB file size limit (ulimit -f): exit 2, one line naming the file."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    argv = [sys.executable, "-m", "RadiogenomicGANLib.phantom", "--out", str(tmp_path / "cohort"), "--patients",
            "1", "--size", "32", "--slices", "8", "--genes", "40", "--quiet"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error:") and "File too large" in done.stderr, done.stderr


def test_the_convention_in_one_place() -> None:
    """Every CLI imports its handler from cli_common: one place says what exit 2 means."""
    for path in ["RadiogenomicGANLib/cli.py", "RadiogenomicGANLib/demo.py", "RadiogenomicGANLib/phantom/__main__.py",
                 "training/prepare.py", "training/train.py", "training/evaluate.py", "training/export.py"]:
        text = (REPO / path).read_text()
        assert "run_cli(" in text, path
        assert "return 1\n" not in text and "SystemExit(f\"error" not in text, path


def test_a_missing_extra_is_named_with_its_install_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Training without the `train` extra: one line saying what to install, not a ModuleNotFoundError."""
    from RadiogenomicGANLib.cli_common import run_cli

    def needs_tensorboard() -> int:
        raise ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")

    assert run_cli(needs_tensorboard) == 2
    assert "pip install 'radiogenomicgan[train]'" in capsys.readouterr().err

    def a_bug() -> int:
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    with pytest.raises(ModuleNotFoundError):
        run_cli(a_bug)


def test_out_of_memory_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    """torch reports a failed allocation as a RuntimeError: a request too large is one line, exit 2."""
    from RadiogenomicGANLib.cli_common import run_cli

    def too_big() -> int:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 400000000000 bytes")

    assert run_cli(too_big) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: not enough memory") and len(error.strip().splitlines()) == 1

    def a_bug() -> int:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError):
        run_cli(a_bug)


@pytest.mark.parametrize(("option", "value", "message"), [("--seed", "-3", "seed must be between"),
                                                           ("--num-workers", "100000", "num_workers must be <=")])
def test_train_options_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str,
                                    message: str) -> None:
    from training.train import main

    argv = ["--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "run"), option, value]
    assert _call(main, argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_os_errors_read_as_one_line() -> None:
    import errno

    from RadiogenomicGANLib.cli_common import describe_os_error

    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/x/y.nrrd")) == \
        "/x/y.nrrd: No space left on device"
    assert "ulimit -f" in describe_os_error(OSError(errno.EFBIG, "File too large", "/x/y.nrrd"))
    assert describe_os_error(FileNotFoundError("no DICOM series under /c")) == "no DICOM series under /c"


def test_training_without_the_extra_stops_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without tensorboard (a plain `pip install`), train says what to install and writes no run folder."""
    import importlib.util

    from training.dataset import make_synthetic_dataset
    from training.train import main

    data = make_synthetic_dataset(tmp_path / "d.npz", patients=8, genes=16, size=32, seed=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert _call(main, ["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    assert "pip install 'radiogenomicgan[train]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
