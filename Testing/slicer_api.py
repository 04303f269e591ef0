"""Which Slicer, Qt, CTK and VTK APIs the module file uses, read from its source (no Slicer needed).

Used by `test_module_slicer_api.py` (every API used is in the recorded table `Testing/slicer_api.md`) and, by
hand, to re-check that table against a Slicer source checkout for each supported release:

    python Testing/slicer_api.py /path/to/Slicer.git v5.10.0 v5.12.3 main   # prints the table

An API is named as the module spells it: a chain from an imported root (`slicer.util.loadUI`,
`qt.Qt.ApplicationModal`, `PyTorchUtils.PyTorchUtilsLogic().installTorch`), a base-class member used through
`self` (`ScriptedLoadableModuleWidget.resourcePath`), a widget member used through `self.ui`
(`qSlicerMarkupsPlaceWidget.placeButton`, the class read from the .ui), a progress-dialog or timer member,
a parameter-node wrapper method, or a VTK/MRML method (CamelCase, `vtk method GetSegmentation`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "RadiogenomicGAN" / "RadiogenomicGAN.py"
UI_FILE = ROOT / "RadiogenomicGAN" / "Resources" / "UI" / "RadiogenomicGAN.ui"
TABLE = Path(__file__).resolve().parent / "slicer_api.md"

IMPORTED_ROOTS = {"slicer", "qt", "vtk", "ctk", "SampleData", "PyTorchUtils"}
BASES = {
    "RadiogenomicGAN": "ScriptedLoadableModule",
    "RadiogenomicGANWidget": "ScriptedLoadableModuleWidget",
    "RadiogenomicGANLogic": "ScriptedLoadableModuleLogic",
    "RadiogenomicGANTest": "ScriptedLoadableModuleTest",
}
QT_OBJECTS = {"_dialog": "QProgressDialog", "dialog": "QProgressDialog", "_timer": "QTimer", "timer": "QTimer"}
#: Our own CamelCase names that are not VTK/MRML methods.
OWN_CAMEL = {"ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
             "ScriptedLoadableModuleTest", "RadiogenomicGANLogic", "RadiogenomicGANParameterNode",
             "RadiogenomicGAN", "BackgroundJob", "Placement", "SliceMode", "Device", "AUTO", "GPU", "CPU",
             "POINTS", "AUTOMATIC", "AROUND_CENTRE", "LIST", "POLL_MS", "SampleDataLogic", "PyTorchUtilsLogic",
             "Requirement", "PackageNotFoundError", "TestCase", "Qt", "QTimer", "ApplicationModal", "Path",
             "StartCloseEvent", "EndCloseEvent", "ModifiedEvent"}


def _chain(node: ast.AST) -> str | None:
    """'slicer.util.loadUI' for an attribute chain from an imported root ('()' marks a call on the way)."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            parts.append("()")
            node = node.func
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            break
        else:
            return None
    text = ".".join(reversed(parts)).replace(".()", "()")
    return text if parts[-1] in IMPORTED_ROOTS else None


def _ui_classes() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_fields(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "RadiogenomicGANParameterNode":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    return set()


def used_apis(source: str | None = None) -> set[str]:
    """Every external API the module file uses, named as described in the module docstring."""
    tree = ast.parse(source if source is not None else MODULE_FILE.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    widgets = _ui_classes()
    fields = _parameter_fields(tree)
    modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names} - IMPORTED_ROOTS
    apis: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in IMPORTED_ROOTS:
            apis.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            apis.update(a.name for a in node.names if a.name.split(".")[0] in IMPORTED_ROOTS - {"slicer", "vtk"})
        elif isinstance(node, ast.Attribute):
            if isinstance(parents.get(node), ast.Attribute):
                continue  # only whole chains
            chain = _chain(node)
            # a member of what a call returned is that object's API (numpy's .copy), except module logics
            if chain is not None and chain not in IMPORTED_ROOTS and (
                    "()." not in chain or chain.startswith(("slicer.modules.", "PyTorchUtils."))):
                apis.add(chain)
            value = node.value
            if isinstance(value, ast.Attribute) and value.attr == "ui" and isinstance(value.value, ast.Name):
                continue
            if (isinstance(value, ast.Attribute) and isinstance(value.value, ast.Attribute)
                    and value.value.attr == "ui"):
                apis.add(f"{widgets.get(value.attr, '?')}.{node.attr}")
            elif isinstance(value, ast.Attribute) and value.attr in QT_OBJECTS and isinstance(value.value, ast.Name):
                apis.add(f"{QT_OBJECTS[value.attr]}.{node.attr}")
            elif isinstance(value, ast.Name) and value.id in QT_OBJECTS:
                apis.add(f"{QT_OBJECTS[value.id]}.{node.attr}")
            elif (isinstance(value, ast.Attribute) and value.attr == "_parameterNode"
                  and node.attr not in fields):
                apis.add(f"parameterNodeWrapper.{node.attr}")
            elif (isinstance(value, ast.Attribute) and value.attr == "parent" and isinstance(value.value, ast.Name)
                  and value.value.id == "self"):
                apis.add(f"qSlicerScriptedLoadableModule parent.{node.attr}")
            own_module = isinstance(value, ast.Name) and value.id in modules
            if (re.fullmatch(r"[A-Z][A-Za-z0-9]+", node.attr) and node.attr not in OWN_CAMEL and not own_module
                    and _chain(node) is None):
                apis.add(f"vtk method {node.attr}")
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in BASES):
        defined = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
        defined |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {t.attr for n in ast.walk(cls) for t in getattr(n, "targets", [])
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        defined |= {e.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Attribute)}
        for node in ast.walk(cls):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and node.attr not in defined):
                apis.add(f"{BASES[cls.name]}.{node.attr}")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name) and node.value.func.id == "super"):
                apis.add(f"{BASES[cls.name]}.{node.attr}")
    return apis


def recorded_apis(table: Path = TABLE) -> dict[str, list[str]]:
    """API → the row's cells, from the Markdown table (first column, in backquotes)."""
    rows: dict[str, list[str]] = {}
    for line in table.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


# --- checking the table against Slicer's source (by hand) --------------------------------------------------
#: (regex, path prefixes) searched in Slicer's tree to confirm an API exists in a release; None = not in the
#: Slicer repository (Qt, CTK, VTK, the PyTorch extension, Python's unittest): recorded as such.
def _needle(api: str) -> tuple[str, list[str]] | None:
    name = re.sub(r"\(\)", "", api).split(".")[-1]
    if api.startswith("vtk method "):
        name = api.split()[-1]
        return rf"\b{name}\s*\(", ["Libs/", "Modules/", "Base/"]
    if api.startswith(("qt.", "QProgressDialog.", "QTimer.", "QLabel.", "QPushButton.", "QComboBox.",
                       "QCheckBox.", "ctkPathLineEdit.", "ctkSliderWidget.", "QSpinBox.", "QLineEdit.")):
        return None
    if api.startswith(("vtk.", "PyTorchUtils", "ScriptedLoadableModuleTest.assert", "ScriptedLoadableModuleTest.skip")):
        return None
    if api.startswith("slicer.util."):
        return rf"^(def|class) {name}\b", ["Base/Python/slicer/util.py"]
    if api.startswith("slicer.parameterNodeWrapper.") or api.startswith("parameterNodeWrapper."):
        return rf"(def|class) _?{name}\b", ["Base/Python/slicer/parameterNodeWrapper/"]
    if api.startswith("slicer.i18n."):
        return rf"def {name}\b", ["Base/Python/slicer/i18n.py"]
    if api.startswith("slicer.packaging."):
        return rf"def {name}\b", ["Base/Python/slicer/packaging.py"]
    if api.startswith("slicer.ScriptedLoadableModule") or api.startswith("ScriptedLoadableModule"):
        return rf"(def|class) {name}\b|self\.{name}\s*=", ["Base/Python/slicer/ScriptedLoadableModule.py",
                                                            "Base/Python/slicer/util.py"]
    if api == "SampleData":
        return r"class SampleDataLogic\b", ["Modules/Scripted/SampleData/"]
    if api.startswith("SampleData."):
        return rf"def {name}\b|class {name}\b", ["Modules/Scripted/SampleData/"]
    if api.startswith("slicer.app."):  # (PythonQt decorators spell it static_qSlicerCoreApplication_<name>)
        return rf"{name}\b", ["Base/QTCore/qSlicerCoreApplication.h", "Base/QTGUI/qSlicerApplication.h",
                                "Base/QTCore/qSlicerBaseQTCorePythonQtDecorators.h"]
    if api.startswith("slicer.modules.markups"):
        return rf"\b{name}\b", ["Modules/Loadable/Markups/Logic/vtkSlicerMarkupsLogic.h"]
    if api.startswith("slicer.modules.plots"):
        return rf"\b{name}\b", ["Modules/Loadable/Plots/Logic/vtkSlicerPlotsLogic.h"]
    if api.startswith("slicer.mrmlScene"):
        return rf"\b{name}\b", ["Libs/MRML/Core/vtkMRMLScene.h", "Base/Python/slicer/"]
    if api.startswith(("slicer.vtkMRML", "slicer.qSlicerMarkupsPlaceWidget", "qSlicerMarkupsPlaceWidget.")):
        return rf"\b{name}\b", ["Libs/MRML/", "Modules/Loadable/Markups/"]
    if api.startswith("qSlicerScriptedLoadableModule parent."):
        return rf"\b{name}\b", ["Base/QTCore/qSlicerAbstractCoreModule.h", "Base/QTGUI/qSlicerAbstractModuleWidget.h"]
    if api.startswith("qMRML"):
        return rf"\b{name}\b", ["Libs/MRML/Widgets/"]
    if api.startswith("slicer.util"):
        return rf"^(def|class) {name}\b", ["Base/Python/slicer/util.py"]
    if api.startswith("slicer."):
        return rf"\b{name}\b", ["Base/Python/slicer/", "Libs/MRML/", "Base/QTCore/", "Base/QTGUI/"]
    return None


def check(repository: str, revisions: list[str]) -> str:
    """The Markdown table, each API looked up in `repository` at every revision (✓ found, ✗ not found)."""
    lines = ["| API | " + " | ".join(revisions) + " | checked in |", "|---|" + "---|" * (len(revisions) + 1)]
    for api in sorted(used_apis()):
        needle = _needle(api)
        if needle is None:
            owner = ("PythonQt" if api == "qt" else "Qt 5" if api.startswith(("qt.", "Q")) else
                     "CTK" if api.startswith("ctk") else "PyTorch extension" if api.startswith("PyTorchUtils") else
                     "unittest" if "Test." in api else "VTK")
            lines.append(f"| `{api}` | " + " | ".join("n/a" for _ in revisions) + f" | {owner} (not Slicer's source) |")
            continue
        pattern, paths = needle
        cells = []
        for revision in revisions:
            done = subprocess.run(["git", "-C", repository, "grep", "-qE", pattern, revision, "--", *paths],
                                  capture_output=True)
            cells.append("✓" if done.returncode == 0 else "✗")
        lines.append(f"| `{api}` | " + " | ".join(cells) + f" | {', '.join(paths)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(check(sys.argv[1], sys.argv[2:]))
