"""Run the insertion CLI in a child process: the Slicer module's responsive, cancellable, crash-proof Apply.

The module writes the input CT to a temporary file, starts `python -m RadiogenomicGANLib insert` on it (with
Slicer's own Python, `PythonSlicer`), polls the child's progress lines from a Qt timer, and loads the output
files when it ends. So the UI stays live while the weights load, the lung mask and the generator run; Cancel
kills the child; a torch or CUDA crash ends only the child (a non-zero exit and its last error line); and
what the module computes is literally what the CLI computes (one request path, `request.py`).

The child is started as `python -c <bootstrap> insert ...`, where the bootstrap puts this Lib's parent folder
on `sys.path` first: the Lib is found whatever PYTHONPATH the launcher sets. Pure Python (no Qt), so it is
tested headless with the real CLI.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from RadiogenomicGANLib.request import InsertionRequest

LIB_PARENT = str(Path(__file__).resolve().parent.parent)
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from RadiogenomicGANLib.{module} import main; sys.exit(main())"
)
PROGRESS_LINE = re.compile(r"PROGRESS (\d*\.?\d+) (.*)")


@dataclass
class InsertionFiles:
    """Where the child reads the CT and writes its results (all in one temporary folder)."""

    folder: Path
    ct: Path
    volume: Path
    segmentation: Path
    weight_map: Path | None


def insertion_files(folder: str | Path, input_name: str, weight_map: bool) -> InsertionFiles:
    """File names in `folder`: the CT is named after the input, so the provenance records the node's name."""
    folder = Path(folder)
    safe = re.sub(r"[^\w.+-]+", "_", input_name).strip("._") or "input"
    return InsertionFiles(folder, folder / f"{safe}.nrrd", folder / "synthetic.nrrd",
                          folder / "synthetic.seg.nrrd", folder / "weightmap.nrrd" if weight_map else None)


def _slice_argument(spec: Any) -> str:
    from RadiogenomicGANLib.request import FIT_TO_SIZE

    if spec is None:
        return FIT_TO_SIZE
    if isinstance(spec, str):
        return spec
    if isinstance(spec, int):
        return f"±{spec}"
    return ",".join(str(int(k)) for k in spec)


def cli_arguments(request: InsertionRequest, files: InsertionFiles, threads: int | None = None) -> list[str]:
    """The `insert` command line that runs `request` on `files` (the same request the CLI would build).

    `threads`: torch CPU threads in the child (default: torch's own choice)."""
    from RadiogenomicGANLib.request import default_weights

    arguments = ["insert", "--ct", str(files.ct), "--weights", str(request.weights or default_weights()),
                 "--device", str(request.device), "--seed", str(int(request.seed)),
                 "--out-volume", str(files.volume), "--out-segmentation", str(files.segmentation), "--progress-lines"]
    # --genes and --sample are required by the CLI even for the inpainting model, which ignores them.
    arguments += ["--genes", str(request.gene_table or files.ct), "--sample", str(request.sample or "-")]
    if request.blend_with:
        arguments += ["--blend-with", request.blend_with, "--blend-weight", repr(float(request.blend_weight))]
    if request.impute_missing_genes:
        arguments.append("--impute-missing-genes")
    if request.half_slices is not None:
        arguments += ["--half-slices", str(int(request.half_slices))]
    if request.auto_count:
        arguments += ["--auto", str(int(request.auto_count))]
    else:
        arguments += [f"--center-ras={x!r},{y!r},{z!r}" for x, y, z in
                      ((float(a), float(b), float(c)) for a, b, c in request.centres_ras)]
    arguments += [f"--slices={_slice_argument(spec)}" for spec in request.slices]
    if request.allow_outside_lung:
        arguments.append("--allow-outside-lung")
    if files.weight_map is not None:
        arguments += ["--out-weight-map", str(files.weight_map)]
    if threads is not None:
        arguments += ["--threads", str(int(threads))]
    return arguments


class BackgroundRun:
    """One Lib CLI (`module`.main) in a child process; `poll()` never blocks, `cancel()` kills it."""

    def __init__(self, arguments: Sequence[str], python: str | None = None, module: str = "cli") -> None:
        self.command = [python or sys.executable, "-c", BOOTSTRAP.format(module=module), LIB_PARENT, *arguments]
        self.fraction = 0.0
        self.message = "Starting"
        self.cancelled = False
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._stderr: list[str] = []
        self._stdout: list[str] = []
        self._threads: list[threading.Thread] = []
        self.process: subprocess.Popen | None = None

    def start(self) -> BackgroundRun:
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", env=environment, start_new_session=os.name != "nt",
            creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\n")))
        stream.close()

    def poll(self) -> bool:
        """Take in the child's output so far; True while it runs."""
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            match = PROGRESS_LINE.fullmatch(line) if name == "out" else None
            if match:
                self.fraction, self.message = float(match.group(1)), match.group(2)
            elif name == "out":
                self._stdout.append(line)
            elif line.strip() and "\r" not in line:
                self._stderr.append(line)
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child ends (tests and the Python console); returns its exit status."""
        assert self.process is not None, "start() first"
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(5.0)
        self.poll()
        return code

    def cancel(self) -> None:
        """Kill the child and everything it started (its own process group)."""
        self.cancelled = True
        if self.process is None or self.process.poll() is not None:
            return
        try:
            if os.name != "nt":
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except ProcessLookupError:
            pass
        self.process.wait(10.0)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def output(self) -> list[str]:
        return list(self._stdout)

    def error_message(self) -> str:
        """The child's own error line ('error: …'), else the end of its stderr, else how it ended."""
        for line in reversed(self._stderr):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        code = self.returncode
        tail = " ".join(self._stderr[-3:]).strip()
        if code is not None and code < 0:
            return f"the computation crashed (signal {-code}){': ' + tail if tail else ''}"
        return tail or f"the computation ended with status {code}"


class BackgroundError(RuntimeError):
    """The child failed; the message is its own error line (or how it ended)."""


class BackgroundCancelled(Exception):
    """The run was cancelled: nothing was produced."""


@dataclass
class LoadedResults:
    """The child's outputs as arrays: what InsertionResult holds, without importing torch in this process."""

    volume_hu: np.ndarray
    label: np.ndarray
    weight_map: np.ndarray | None
    centres_ras: np.ndarray
    slices: list[list[int]]
    provenance: dict[str, Any] = field(default_factory=dict)


def write_input_volume(path: str | Path, array: np.ndarray, geometry: Any) -> Path:
    """The CT for the child, uncompressed (a 512² × 300 CT gzips for seconds; the file lives for one run)."""
    import numpy as np
    import SimpleITK as sitk

    origin, spacing, direction = geometry.to_lps()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    sitk.WriteImage(image, str(path), useCompression=False)
    return Path(path)


def read_results(files: InsertionFiles) -> LoadedResults:
    """The child's output files as arrays (volume, label, weight map, provenance), for the adapter.

    The provenance is the JSON the CLI stores in the output volume's header; the number of nodules and their
    centres and slices come from it, so the nodes built from it match the in-process path's.
    """
    import json

    import numpy as np
    import SimpleITK as sitk

    def read(path: Path) -> tuple[Any, np.ndarray]:
        image = sitk.ReadImage(str(path))
        return image, sitk.GetArrayFromImage(image)

    image, volume = read(files.volume)
    key = "RadiogenomicGAN_Provenance"
    provenance = json.loads(image.GetMetaData(key)) if image.HasMetaDataKey(key) else {}
    _, label = read(files.segmentation)
    weight_map = None
    if files.weight_map is not None and files.weight_map.exists():
        weight_map = read(files.weight_map)[1].astype(np.float32)
    centres = np.asarray(provenance.get("centres_ras", []), dtype=np.float64).reshape(-1, 3)
    return LoadedResults(volume, label.astype(np.uint8), weight_map, centres, provenance.get("slices", []),
                         provenance)


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A private folder for one run's files (removed by the caller's cleanup)."""
    return tempfile.TemporaryDirectory(prefix="RadiogenomicGAN-")
