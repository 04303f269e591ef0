"""The module file imports under the Python of each Slicer it must load in, with Slicer's modules stubbed.

Slicer loads RadiogenomicGAN.py inside the application: a SyntaxError or an annotation that Python cannot
evaluate there makes the module silently vanish. Here other interpreters (pyenv's 3.9 = Slicer 5.8, 3.12 =
Slicer 5.10/5.12) import it with stand-ins for `slicer`, `qt`, `vtk` whose `parameterNodeWrapper` evaluates
the parameter node's annotations with `typing.get_type_hints(..., include_extras=True)`, as Slicer's does. The
application branch of the guarded import is taken (`slicer.app` exists). Checked: the four template classes
load, the module registers Sample Data only where supported, the self test skips with its reason where
ctest would run it on a factory Slicer (no PyTorch), the Lib is found from a source checkout (only
the module folder on sys.path, as Slicer does), and on 3.9 the module says it needs Slicer 5.10 (panel text,
Logic error) instead of failing. Interpreters that are not installed are skipped with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "RadiogenomicGAN" / "RadiogenomicGAN.py"

STUBS = {
    "slicer/__init__.py": '''
        class _Node:
            pass
        class vtkMRMLScalarVolumeNode(_Node): pass
        class vtkMRMLMarkupsFiducialNode(_Node): pass
        class vtkMRMLSegmentationNode(_Node): pass
        class _App:
            connections = []
            def connect(self, signal, slot):
                self.connections.append(signal)
            def testingEnabled(self):  # ctest on the extension index's factory build
                return True
        app = _App()
        class _Scene:
            def Clear(self): pass
        mrmlScene = _Scene()
        from . import util
    ''',
    "slicer/util.py": '''
        class VTKObservationMixin:
            def __init__(self): pass
    ''',
    "slicer/i18n.py": '''
        def tr(text): return text
        def translate(context, text): return text
    ''',
    "slicer/parameterNodeWrapper.py": '''
        import typing
        class WithinRange:
            def __init__(self, minimum, maximum): self.minimum, self.maximum = minimum, maximum
        def parameterNodeWrapper(classtype):
            # Slicer 5.8-5.12 (parameterNodeWrapper/wrapper.py) evaluates every annotation like this:
            classtype._members = typing.get_type_hints(classtype, include_extras=True)
            return classtype
    ''',
    "slicer/ScriptedLoadableModule.py": '''
        import unittest
        __all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                   "ScriptedLoadableModuleTest"]
        class ScriptedLoadableModule:
            def __init__(self, parent): self.parent = parent
        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None): self.parent = parent
        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None): pass
        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=None): pass
    ''',
    "qt.py": '''
        class Qt:
            ApplicationModal = 2
        class QTimer:
            pass
    ''',
    "vtk.py": '''
        class vtkCommand:
            ModifiedEvent = 33
    ''',
    "numpy.py": '''
        ndarray = object
        integer = int
    ''',
}

PROBE = '''
import importlib.util, json, sys, unittest
spec = importlib.util.spec_from_file_location("RadiogenomicGAN", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["RadiogenomicGAN"] = module
spec.loader.exec_module(module)

class Parent:
    pass

info = module.RadiogenomicGAN(Parent())
logic = module.RadiogenomicGANLogic()
try:
    logic.buildRequest(None, None, None)
    logic_error = None
except Exception as error:
    logic_error = f"{type(error).__name__}: {error}"
try:  # the self test as ctest runs it: no PyTorch in a factory Slicer
    module.RadiogenomicGANTest().runTest()
    self_test = "ran"
except unittest.SkipTest as skipped:
    self_test = f"skipped: {skipped}"
except Exception as error:
    self_test = f"{type(error).__name__}: {error}"
print(json.dumps({
    "self_test": self_test,
    "application": module.SLICER_APPLICATION,
    "classes": [c for c in ("RadiogenomicGAN", "RadiogenomicGANWidget", "RadiogenomicGANLogic",
                            "RadiogenomicGANTest") if hasattr(module, c)],
    "parameters": sorted(module.RadiogenomicGANParameterNode._members),
    "unsupported": module.unsupportedReason(),
    "registers_sample_data": "startupCompleted()" in sys.modules["slicer"].app.connections,
    "lib_found": importlib.util.find_spec("RadiogenomicGANLib") is not None,
    "title": Parent.title if hasattr(Parent, "title") else info.parent.title,
    "logic_error": logic_error,
}))
'''


def _interpreter(version: str) -> str | None:
    """pyenv's python<version> (this project's machines have 3.9 and 3.12 there), else one on PATH."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"), "/root/.pyenv"]
    for root in filter(None, roots):
        found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3")))
        if found:
            return found[-1]
    return shutil.which(f"python{version}")


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slicer_stubs")
    for name, text in STUBS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def _probe(python: str, stubs: Path, tmp_path: Path) -> dict:
    """Import the module file in `python`: stubs and the module folder on the path, as Slicer's, nothing else."""
    path = os.pathsep.join([str(stubs), str(MODULE_FILE.parent)])
    environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path, "PYTHONNOUSERSITE": "1",
                   "HOME": str(tmp_path)}
    done = subprocess.run([python, "-S", "-c", PROBE, str(MODULE_FILE)], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("version", "supported"), [("3.9", False), ("3.12", True)])
def test_module_imports_under_slicers_python(version: str, supported: bool, stubs: Path, tmp_path: Path) -> None:
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv or PATH): the module's import under it is not checked")
    found = _probe(python, stubs, tmp_path)
    assert found["application"] is True
    assert found["classes"] == ["RadiogenomicGAN", "RadiogenomicGANWidget", "RadiogenomicGANLogic",
                                "RadiogenomicGANTest"]
    assert {"inputVolume", "geneTablePath", "blendWeight", "outputWeightMap"} <= set(found["parameters"])
    assert found["lib_found"], "running from source: the Lib at the repository root was not made importable"
    assert found["title"] == "RadiogenomicGAN"
    if supported:
        assert found["unsupported"] is None and found["registers_sample_data"]
        assert not found["logic_error"].startswith("RuntimeError"), found  # (the stubs lack vtk.util: that error)
        assert found["self_test"].startswith("skipped: RadiogenomicGAN needs torch>=2.3"), found["self_test"]
    else:
        assert "5.10" in found["unsupported"] and "Python 3.9" in found["unsupported"]
        assert not found["registers_sample_data"]
        assert found["logic_error"] == f"RuntimeError: {found['unsupported']}"
        assert found["self_test"] == f"skipped: {found['unsupported']}"
