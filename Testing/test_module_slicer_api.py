"""Every Slicer API the module uses is recorded in Testing/slicer_api.md, checked for the supported releases.

The table was produced by `python Testing/slicer_api.py SLICER_REPO v5.8.1 v5.10.0 v5.12.3 HEAD` (git grep in
Slicer's source at each release). This test needs no Slicer: it reads the module's source, so a new call to an
API nobody checked fails here until the table is re-made, and a row the module no longer uses goes.
"""

from __future__ import annotations

import ast

import slicer_api

SUPPORTED = ("v5.10.0", "v5.12.3", "HEAD")
#: APIs newer than the oldest supported release, each called behind a guard (see slicer_api.md).
GUARDED = {
    "SampleData.SampleDataLogic.registerCustomSampleDataCategory": 'hasattr(SampleData.SampleDataLogic, '
                                                                   '"registerCustomSampleDataCategory")',
    "slicer.packaging.pip_ensure": "from slicer.packaging import pip_ensure",
}


def _header() -> list[str]:
    for line in slicer_api.TABLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| API |"):
            return [cell.strip() for cell in line.strip("|").split("|")][1:]
    raise AssertionError("no table header in slicer_api.md")


def test_every_api_the_module_uses_is_recorded() -> None:
    used = slicer_api.used_apis()
    recorded = slicer_api.recorded_apis()
    assert len(used) > 80, "the extractor found too little: is it still reading the module?"
    missing = sorted(used - set(recorded))
    assert not missing, ("APIs used by RadiogenomicGAN.py but not checked in Testing/slicer_api.md (re-make it "
                         f"with Testing/slicer_api.py): {missing}")
    stale = sorted(set(recorded) - used)
    assert not stale, f"rows of slicer_api.md the module no longer uses: {stale}"


def test_recorded_apis_exist_in_every_supported_release() -> None:
    header = _header()
    columns = [header.index(version) for version in SUPPORTED]
    for api, cells in slicer_api.recorded_apis().items():
        for column in columns:
            value = cells[column]
            assert value in ("✓", "n/a") or api in GUARDED, f"{api} is {value} in Slicer {header[column]}"


def test_newer_apis_are_called_behind_their_guard() -> None:
    source = slicer_api.MODULE_FILE.read_text(encoding="utf-8")
    for api, guard in GUARDED.items():
        assert guard in source, f"{api} is not guarded by {guard!r}"
    tree = ast.parse(source)
    guarded_imports = [n for t in ast.walk(tree) if isinstance(t, ast.Try)
                       and any(ast.unparse(h.type) == "ImportError" for h in t.handlers if h.type is not None)
                       for n in t.body if isinstance(n, ast.ImportFrom) and n.module == "slicer.packaging"]
    assert guarded_imports, "slicer.packaging (Slicer 5.12+) must be imported inside try/except ImportError"


def test_the_extractor_sees_what_it_claims() -> None:
    """A module that calls a new API, through each kind of name, is caught."""
    source = slicer_api.MODULE_FILE.read_text(encoding="utf-8") + '''

class RadiogenomicGANWidget2:
    def f(self):
        slicer.util.brandNewHelper()
        self.ui.applyButton.animateClick()
        self._dialog.setBar(None)
        node.GetBrandNewThing()
'''
    new = slicer_api.used_apis(source) - slicer_api.used_apis()
    assert new == {"slicer.util.brandNewHelper", "QPushButton.animateClick", "QProgressDialog.setBar",
                   "vtk method GetBrandNewThing"}
