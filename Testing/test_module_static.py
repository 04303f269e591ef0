"""Static consistency of the Slicer module: the .ui, the parameter node, the Widget code and the CMake files.

The Widget only runs inside Slicer, so the mistakes that would break it there are caught here by reading
the files: a `self.ui.X` with no widget X, a `SlicerParameterName` with no parameter (connectGui raises),
a widget that cannot represent its parameter's type, an MRML widget that never receives the scene, a file
named in CMake that does not exist, a new Lib file nobody added to CMake, missing extension metadata.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "RadiogenomicGAN"
MODULE_FILE = MODULE_DIR / "RadiogenomicGAN.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "RadiogenomicGAN.ui"
LIB_DIR = ROOT / "RadiogenomicGANLib"
PARAMETER_CLASS = "RadiogenomicGANParameterNode"

# Which widget classes parameterNodeWrapper can connect to which parameter types (its GuiConnector
# `canRepresent` rules, Slicer 5.8+), keyed by the unannotated type.
WIDGETS_FOR_TYPE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
            "ctkDoubleSpinBox", "qMRMLSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}
# Widgets whose connector refuses an unbounded value (RuntimeError in connectGui).
NEEDS_RANGE = {"QSlider", "ctkSliderWidget", "qMRMLSliderWidget"}


# --- parsing helpers ------------------------------------------------------------------------------------
def _ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui_tree().iter("widget")}


def _parameter_names_in_ui() -> dict[str, ET.Element]:
    found: dict[str, ET.Element] = {}
    for widget in _ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.findtext("string")
                assert name not in found, f"parameter {name!r} is bound to two widgets"
                found[name] = widget
    return found


def _module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in {MODULE_FILE.name}")


def _parameter_fields() -> dict[str, ast.expr]:
    cls = _class(_module_ast(), PARAMETER_CLASS)
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: n.annotation for n in cls.body if isinstance(n, ast.AnnAssign)}


def _enum_classes(tree: ast.Module) -> set[str]:
    return {
        n.name for n in tree.body
        if isinstance(n, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in n.bases)
    }


def _kind_of(annotation: ast.expr, enums: set[str]) -> tuple[str, bool]:
    """(type kind for WIDGETS_FOR_TYPE, has a WithinRange annotation)."""
    bounded = False
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
        elements = annotation.slice.elts  # type: ignore[attr-defined]
        bounded = any("WithinRange" in ast.unparse(e) for e in elements[1:])
        annotation = elements[0]
    text = ast.unparse(annotation)
    if text in enums:
        return "enum", bounded
    if text.startswith("vtkMRML"):
        return "node", bounded
    return text, bounded


def _without_widget() -> tuple[str, ...]:
    for node in _module_ast().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAMETERS_WITHOUT_WIDGET"
                                                for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def _cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMakeLists.txt: comments outside quotes removed, quotes kept as one arg."""
    text = path.read_text(encoding="utf-8")
    clean, quoted = [], False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted = not quoted
        if ch == "#" and not quoted:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        clean.append(ch)
        i += 1
    source = "".join(clean)
    commands = []
    for match in re.finditer(r"(\w+)\s*\(", source):
        depth, j, quoted = 1, match.end(), False
        while depth:
            ch = source[j]
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch == "(":
                depth += 1
            elif not quoted and ch == ")":
                depth -= 1
            j += 1
        arguments = re.findall(r'"[^"]*"|[^\s"]+', source[match.end() : j - 1])
        commands.append((match.group(1).lower(), [a.strip('"') for a in arguments]))
    return commands


def _cmake_sets(path: Path) -> dict[str, list[str]]:
    variables: dict[str, list[str]] = {}
    for command, arguments in _cmake_commands(path):
        if command == "set" and arguments:
            values = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), a)
                      for a in arguments[1:]]
            variables[arguments[0]] = values
    return variables


def _cmake_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("CMakeLists.txt") if ".venv" not in p.parts and "demo_output" not in p.parts)


FILE_LIKE = re.compile(r"\.(py|png|svg|ui|txt|json|safetensors|nrrd|csv)$")
# The bundled demo generator comes from the training issue (trained, then committed by the lead); until it
# is there, its two files are checked by test_bundled_demo_weights_are_present alone, which skips.
DEMO_WEIGHTS = {"Resources/demo_model.safetensors", "Resources/demo_model.json"}


# --- the .ui and the Widget -----------------------------------------------------------------------------
def test_ui_is_a_qmrml_widget_named_like_the_module() -> None:
    root = _ui_tree()
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "RadiogenomicGAN"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names in the .ui"


def test_every_self_ui_attribute_is_a_widget_of_the_ui() -> None:
    used = {
        node.attr for node in ast.walk(_module_ast())
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
    }
    assert used, "the Widget uses no self.ui.X at all?"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"self.ui.X used in RadiogenomicGAN.py but not in the .ui: {missing}"


def test_every_slicer_parameter_name_is_a_parameter_and_every_parameter_has_a_widget() -> None:
    fields = _parameter_fields()
    in_ui = _parameter_names_in_ui()
    manual = set(_without_widget())
    unknown = sorted(set(in_ui) - set(fields))
    assert not unknown, f"SlicerParameterName without a {PARAMETER_CLASS} field (connectGui would raise): {unknown}"
    assert manual <= set(fields), f"PARAMETERS_WITHOUT_WIDGET names unknown fields: {sorted(manual - set(fields))}"
    assert not manual & set(in_ui), "a parameter is both bound in the .ui and synced by hand"
    unbound = sorted(set(fields) - set(in_ui) - manual)
    assert not unbound, f"parameters with no widget (add SlicerParameterName or list them as manual): {unbound}"
    source = MODULE_FILE.read_text(encoding="utf-8")
    for name in manual:  # a hand-synced parameter must really be written by the Widget
        assert re.search(rf"_parameterNode\.{name}\s*=|p\.{name}\s*=", source), f"{name} is never synced"


def test_each_bound_widget_can_represent_its_parameter_type() -> None:
    tree = _module_ast()
    enums = _enum_classes(tree)
    fields = _parameter_fields()
    for name, widget in _parameter_names_in_ui().items():
        kind, bounded = _kind_of(fields[name], enums)
        cls = widget.get("class")
        assert kind in WIDGETS_FOR_TYPE, f"{name}: no known widget for type {kind}"
        assert cls in WIDGETS_FOR_TYPE[kind], f"{name}: a {cls} cannot represent {kind}"
        if cls in NEEDS_RANGE:
            assert bounded, f"{name}: a {cls} needs a WithinRange annotation"
        if kind == "node":
            types = [s.text for s in widget.iter("string") if s.text and s.text.startswith("vtkMRML")]
            assert ast.unparse(fields[name]) in types, f"{name}: nodeTypes {types} vs {ast.unparse(fields[name])}"


def test_every_mrml_widget_receives_the_scene() -> None:
    root = _ui_tree()
    receivers = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("sender") == "RadiogenomicGAN" and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml = {w.get("name") for w in root.iter("widget") if re.match(r"q(MRML|Slicer)\w+", w.get("class", ""))}
    mrml.discard("RadiogenomicGAN")
    assert mrml, "no MRML widgets?"
    assert not sorted(mrml - receivers), f"MRML widgets without mrmlSceneChanged→setMRMLScene: {mrml - receivers}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget") if not w.get("class", "").startswith("Q")}
    assert used <= declared, f"custom widgets used but not declared: {used - declared}"


def test_module_file_follows_the_template_and_loads_without_torch() -> None:
    tree = _module_ast()
    for name in ("RadiogenomicGAN", "RadiogenomicGANWidget", "RadiogenomicGANLogic", "RadiogenomicGANTest"):
        _class(tree, name)
    test_class = _class(tree, "RadiogenomicGANTest")
    assert {"setUp", "runTest"} <= {f.name for f in test_class.body if isinstance(f, ast.FunctionDef)}
    logic = _class(tree, "RadiogenomicGANLogic")
    insert = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == "insertNodules")
    arguments = [a.arg for a in insert.args.args]
    expected = ["self", "inputVolumeNode", "geneTablePath", "sampleId", "pointListNode", "autoCount", "halfSlices",
                "sliceList", "seed", "weightsPath", "device", "blendSampleId", "blendWeight", "outputWeightMap",
                "allowOutsideLung", "progress", "scene"]
    assert arguments[: len(expected)] == expected
    # Module-level imports must not need torch or the heavy Lib modules: the module has to load in a Slicer
    # without PyTorch to offer its installation.
    heavy = {"torch", "safetensors", "scipy", "sklearn", "RadiogenomicGANLib"}
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not {n.split(".")[0] for n in names} & heavy, f"module-level import of {names}"
    # The headless fallback catches ImportError only, and re-raises inside the application.
    guards = [n for n in tree.body if isinstance(n, ast.Try)]
    assert len(guards) == 1
    handler = guards[0].handlers[0]
    assert ast.unparse(handler.type) == "ImportError"
    assert any(isinstance(n, ast.Raise) for n in ast.walk(handler)), "the fallback must re-raise inside Slicer"


def test_only_the_adapter_imports_slicer_or_vtk() -> None:
    offenders = []
    for path in sorted(LIB_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if {n.split(".")[0] for n in names} & {"slicer", "vtk", "vtkmodules", "qt", "ctk"}:
                offenders.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(offenders)) == ["RadiogenomicGANLib/mrml_adapter.py"]


# --- CMake ------------------------------------------------------------------------------------------------
def test_cmake_files_exist_and_name_existing_files() -> None:
    files = _cmake_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"CMakeLists.txt", "RadiogenomicGAN/CMakeLists.txt", "RadiogenomicGAN/Testing/CMakeLists.txt",
            "RadiogenomicGAN/Testing/Python/CMakeLists.txt"} <= names
    missing = []
    for path in files:
        variables = _cmake_sets(path)
        referenced = [v for values in variables.values() for v in values if FILE_LIKE.search(v) and "://" not in v]
        for command, arguments in _cmake_commands(path):
            if command == "slicer_add_python_unittest" and "SCRIPT" in arguments:
                referenced.append(arguments[arguments.index("SCRIPT") + 1].replace("${MODULE_NAME}",
                                                                                      variables["MODULE_NAME"][0]))
            if command == "add_subdirectory" and not (path.parent / arguments[0] / "CMakeLists.txt").is_file():
                missing.append(f"{path.relative_to(ROOT)}: add_subdirectory({arguments[0]})")
        for name in referenced:
            if path.parent == ROOT and name in DEMO_WEIGHTS:
                continue
            if not (path.parent / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "CMake names files that do not exist:\n" + "\n".join(missing)


def test_bundled_demo_weights_are_present() -> None:
    top = _cmake_sets(ROOT / "CMakeLists.txt")
    assert set(top["RADIOGENOMICGANLIB_PYTHON_RESOURCES"]) == DEMO_WEIGHTS
    absent = sorted(name for name in DEMO_WEIGHTS if not (ROOT / name).is_file())
    if absent == sorted(DEMO_WEIGHTS):
        pytest.skip("the bundled demo model is not committed yet (training issue): " + ", ".join(absent))
    assert not absent, f"half of the bundled demo model is missing: {absent}"


def test_every_python_file_and_resource_is_listed() -> None:
    top = _cmake_sets(ROOT / "CMakeLists.txt")
    listed_lib = set(top["RADIOGENOMICGANLIB_PYTHON_SCRIPTS"])
    on_disk = {p.relative_to(ROOT).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    unlisted = sorted(on_disk - listed_lib)
    assert not unlisted, f"Lib files missing from RADIOGENOMICGANLIB_PYTHON_SCRIPTS (top CMakeLists.txt): {unlisted}"

    module = _cmake_sets(MODULE_DIR / "CMakeLists.txt")
    scripts = set(module["MODULE_PYTHON_SCRIPTS"])
    resources = set(module["MODULE_PYTHON_RESOURCES"])
    module_py = {p.name for p in MODULE_DIR.glob("*.py")}
    assert module_py <= scripts, f"module scripts not listed: {module_py - scripts}"
    module_resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                        if p.is_file()}
    assert module_resources <= resources, f"module resources not listed: {module_resources - resources}"


def test_extension_metadata() -> None:
    commands = _cmake_commands(ROOT / "CMakeLists.txt")
    variables = _cmake_sets(ROOT / "CMakeLists.txt")
    assert ("project", ["RadiogenomicGAN"]) in commands
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert variables.get(key) and all(variables[key]), f"{key} is missing or empty"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert all(v.startswith("https://") for v in variables[key]), f"{key} must be https URLs"
    assert "PyTorch" in " ".join(variables["EXTENSION_DEPENDS"]).split()
    icon = variables["EXTENSION_ICONURL"][0].split("/main/", 1)[-1]
    assert (ROOT / icon).is_file(), f"EXTENSION_ICONURL points at {icon}, which is not in the repository"
    subdirectories = [a[0] for c, a in commands if c == "add_subdirectory"]
    assert "RadiogenomicGAN" in subdirectories
    includes = " ".join(" ".join(a) for c, a in commands if c == "include")
    assert "Slicer_USE_FILE" in includes and "Slicer_EXTENSION_CPACK" in includes


@pytest.mark.parametrize("cmake", ["CMakeLists.txt", "RadiogenomicGAN/CMakeLists.txt"])
def test_scripted_module_macro_calls_are_well_formed(cmake: str) -> None:
    calls = [a for c, a in _cmake_commands(ROOT / cmake) if c == "slicermacrobuildscriptedmodule"]
    assert calls, f"{cmake} builds no scripted module"
    for arguments in calls:
        assert {"NAME", "SCRIPTS"} <= set(arguments)
