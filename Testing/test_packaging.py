"""Packaging: what `pip install` of a wheel built from this checkout gets (issue 11).

The full check — a wheel installed into a clean virtual environment running `insert` with its bundled model
from another folder — needs a torch download and takes minutes; it was run by hand (README, Installation).
These tests keep the pieces it relies on from drifting: every package folder is listed, the training package
imports itself relatively (it installs as `radiogenomicgan_training`), the bundled model is package data,
every console script resolves, and a wheel built here holds exactly that.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
#: installed name → checkout name (the pyproject's package-dir, reversed for importing from the checkout)
CHECKOUT_NAME = {"radiogenomicgan_training": "training"}


def _folder(package: str) -> Path:
    mapped = SETUPTOOLS.get("package-dir", {}).get(package)
    return REPO / (mapped if mapped else package.replace(".", "/"))


def test_every_package_folder_is_listed() -> None:
    listed = {_folder(p).resolve() for p in SETUPTOOLS["packages"]}
    for root in ("RadiogenomicGANLib", "training"):
        for init in (REPO / root).rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is not in pyproject's packages"


def test_training_imports_itself_relatively() -> None:
    """Installed as radiogenomicgan_training, `from training.x import` would fail (or import someone else's)."""
    for path in (REPO / "training").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            assert not stripped.startswith(("from training", "import training")), f"{path.name}:{number}: {line}"


def test_no_top_level_training_package_and_no_unused_dependency() -> None:
    assert "training" not in SETUPTOOLS["packages"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in PYPROJECT["project"]["dependencies"]}
    assert "nibabel" not in names and "tensorboard" not in names and "scikit-image" not in names
    assert {"tensorboard", "scikit-image"} <= {d.split(">")[0] for d in PYPROJECT["project"]["optional-dependencies"]
                                               ["train"]}


def test_the_bundled_model_is_package_data() -> None:
    files = SETUPTOOLS["package-data"]["RadiogenomicGANLib.bundled_model"]
    folder = _folder("RadiogenomicGANLib.bundled_model")
    assert folder == REPO / "Resources"
    for name in files:
        assert (folder / name).is_file(), name
    from RadiogenomicGANLib.bundled import PACKAGE, STEM, bundled_weights_path, verify_bundled

    assert PACKAGE == "RadiogenomicGANLib.bundled_model" and f"{STEM}.safetensors" in files
    # from a checkout there is no such package: the checkout's Resources/ is used, and it is intact
    assert verify_bundled() == bundled_weights_path() == REPO / "Resources" / "demo_model.safetensors"


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_resolve(script: str) -> None:
    module, _, function = PYPROJECT["project"]["scripts"][script].partition(":")
    top, _, rest = module.partition(".")
    module = ".".join(filter(None, [CHECKOUT_NAME.get(top, top), rest]))
    assert callable(getattr(importlib.import_module(module), function))


def test_a_wheel_built_here_ships_the_model_and_no_training_top_level(tmp_path: Path) -> None:
    """Built from a copy (no build/ or egg-info left in the checkout); about a second without isolation."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("this environment's setuptools predates the PEP 639 license string (needs ≥ 77)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("RadiogenomicGANLib", "training"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "Resources").mkdir()
    for path in (REPO / "Resources").glob("demo_model.*"):
        shutil.copy(path, source / "Resources" / path.name)
    (source / "Resources" / "demo_panel.png").write_bytes(b"not package data")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("radiogenomicgan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"RadiogenomicGANLib", "radiogenomicgan_training", wheel.name.split("-py3")[0] + ".dist-info"}
    model = sorted(n for n in names if n.startswith("RadiogenomicGANLib/bundled_model/"))
    assert model == [f"RadiogenomicGANLib/bundled_model/demo_model.{s}" for s in ("json", "safetensors", "sha256")]
    assert "radiogenomicgan_training/train.py" in names and "RadiogenomicGANLib/phantom/writers.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "radiogenomicgan-insert = RadiogenomicGANLib.cli:insert_main" in entry_points
