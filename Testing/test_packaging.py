"""Packaging: what `pip install` of a wheel built from this checkout gets (issue 11).

The full check — a wheel installed into a clean virtual environment running `insert` with its bundled model
from another folder — needs a torch download and takes minutes; it was run by hand (README, Installation).
These tests keep the pieces it relies on from drifting: the training package imports itself relatively (it
installs as `radiogenomicgan_training`), the bundled model is package data, every console script resolves,
and a wheel built here (about a second) holds every package folder of the checkout under its installed name.
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
#: installed name → checkout name (setup.py's package_dir, reversed for importing from the checkout)
CHECKOUT_NAME = {"radiogenomicgan_training": "training"}


def test_training_imports_itself_relatively() -> None:
    """Installed as radiogenomicgan_training, `from training.x import` would fail (or import someone else's)."""
    for path in (REPO / "training").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            assert not stripped.startswith(("from training", "import training")), f"{path}:{number}: {line}"


def test_dependencies_and_extras() -> None:
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in PYPROJECT["project"]["dependencies"]}
    assert "nibabel" not in names and "tensorboard" not in names and "scikit-image" not in names
    train = {d.split(">")[0] for d in PYPROJECT["project"]["optional-dependencies"]["train"]}
    assert {"tensorboard", "scikit-image"} <= train
    assert "scipy>=1.11" in PYPROJECT["project"]["dependencies"]          # scipy.stats.false_discovery_control
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]   # PEP 639 license string


def test_the_bundled_model_is_found_from_a_checkout() -> None:
    from RadiogenomicGANLib.bundled import bundled_weights_path, verify_bundled

    # a checkout has no RadiogenomicGANLib.bundled_model package: Resources/ is used, and it is intact
    assert verify_bundled() == bundled_weights_path() == REPO / "Resources" / "demo_model.safetensors"


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_resolve(script: str) -> None:
    module, _, function = PYPROJECT["project"]["scripts"][script].partition(":")
    top, _, rest = module.partition(".")
    module = ".".join(filter(None, [CHECKOUT_NAME.get(top, top), rest]))
    assert callable(getattr(importlib.import_module(module), function))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the checkout (no build/ or egg-info left here), without build isolation."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("this environment's setuptools predates the PEP 639 license string (needs ≥ 77)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("RadiogenomicGANLib", "training"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "Resources").mkdir()
    for path in (REPO / "Resources").glob("demo_model.*"):
        shutil.copy(path, source / "Resources" / path.name)
    (source / "Resources" / "demo_panel.png").write_bytes(b"not package data")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = (root / "dist").glob("radiogenomicgan-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_every_package_under_its_installed_name(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} == {"RadiogenomicGANLib", "radiogenomicgan_training", dist_info}
    for root, installed in (("RadiogenomicGANLib", "RadiogenomicGANLib"), ("training", "radiogenomicgan_training")):
        for module in (REPO / root).rglob("*.py"):
            if "__pycache__" in module.parts:
                continue
            inside = module.relative_to(REPO / root).as_posix()
            assert f"{installed}/{inside}" in names, f"{module} is not in the wheel"


def test_the_wheel_ships_the_demo_model_and_the_scripts(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    model = sorted(n for n in names if n.startswith("RadiogenomicGANLib/bundled_model/"))
    assert model == [f"RadiogenomicGANLib/bundled_model/demo_model.{s}" for s in ("json", "safetensors", "sha256")]
    for name in model:  # byte for byte what Resources/ holds
        assert wheel.read(name) == (REPO / "Resources" / name.rsplit("/", 1)[1]).read_bytes(), name
    entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in entry_points
