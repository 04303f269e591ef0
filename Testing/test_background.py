"""The background runner the module's Apply uses: progress lines, the child's error line, a crash, Cancel.

The child is a real Lib CLI in a real process; a crash is simulated by signalling the child, as a segfault in
torch or CUDA would end it. Whatever happens to the child, the caller gets an exit status and a message.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from RadiogenomicGANLib import background
from RadiogenomicGANLib.request import InsertionRequest


def test_progress_lines_are_parsed_and_other_output_kept() -> None:
    run = background.BackgroundRun([])
    run._lines.put(("out", "PROGRESS 0.250 Extracting patches"))
    run._lines.put(("out", "Inserted 1 synthetic nodule(s)"))
    run._lines.put(("err", "error: the sample 'X' is not in the table"))
    assert run.poll() is False  # never started: not running
    assert (run.fraction, run.message) == (0.25, "Extracting patches")
    assert run.output == ["Inserted 1 synthetic nodule(s)"]
    assert run.error_message() == "the sample 'X' is not in the table"


def test_the_childs_bad_input_is_its_one_line(tmp_path) -> None:
    run = background.BackgroundRun(["--genes", str(tmp_path / "none.txt"), "--out", str(tmp_path / "m.csv"),
                                    "--weights", str(tmp_path / "none.safetensors")], module="radiogenomic_map")
    assert run.start().wait(120) == 2
    assert "weights file not found" in run.error_message()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_crashed_child_is_an_exit_status_and_a_message(tmp_path) -> None:
    run = background.BackgroundRun(["--genes", "g", "--out", str(tmp_path / "m.csv")], module="radiogenomic_map")
    run.start()
    os.kill(run.process.pid, signal.SIGSEGV)  # what a crash in torch would do to the child
    assert run.wait(60) == -signal.SIGSEGV
    assert run.error_message().startswith(f"the computation crashed (signal {int(signal.SIGSEGV)})")
    assert not run.cancelled


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_kills_the_child_at_once() -> None:
    run = background.BackgroundRun([])
    run.command = [sys.executable, "-c", "import time; time.sleep(60)"]  # a child that would run for a minute
    started = time.monotonic()
    run.start()
    assert run.poll() is True
    run.cancel()
    assert run.returncode == -signal.SIGKILL and run.cancelled and time.monotonic() - started < 10


def test_cli_arguments_say_the_request(tmp_path) -> None:
    files = background.insertion_files(tmp_path, "Chest CT #1", weight_map=True)
    assert files.ct.name == "Chest_CT_1.nrrd"
    request = InsertionRequest(sample="S1", gene_table="g.txt", blend_with="S2", blend_weight=0.3,
                               weights="w.safetensors", device="cpu", centres_ras=[[1.5, -2.0, 3.25]],
                               slices=("±2", [4, 5]), seed=7, allow_outside_lung=True, weight_map=True,
                               impute_missing_genes=True)
    arguments = background.cli_arguments(request, files, threads=1)
    text = " ".join(arguments)
    for expected in ("--weights w.safetensors", "--device cpu", "--seed 7", "--blend-with S2", "--blend-weight 0.3",
                     "--impute-missing-genes", "--center-ras=1.5,-2.0,3.25", "--slices=±2", "--slices=4,5",
                     "--allow-outside-lung", "--out-weight-map", "--progress-lines", "--threads 1"):
        assert expected in text, expected
    from RadiogenomicGANLib import cli

    parsed = cli.build_parser().parse_args(arguments)  # the CLI accepts exactly what the module sends
    assert parsed.sample == "S1" and parsed.center_ras == ["1.5,-2.0,3.25"] and parsed.slices == ["±2", "4,5"]
    fitted = background.cli_arguments(InsertionRequest(sample="S1", auto_count=1, slices=(None,)), files)
    assert cli.build_parser().parse_args(fitted).slices == ["auto"]   # None: fitted to the nodule's size
    default = cli.build_parser().parse_args(background.cli_arguments(InsertionRequest(sample="S1", auto_count=1),
                                                                     files))
    assert default.slices is None and default.half_slices is None   # the CLI's default: fitted as well
    explicit = background.cli_arguments(InsertionRequest(sample="S1", auto_count=1, half_slices=3), files)
    assert cli.build_parser().parse_args(explicit).half_slices == 3
