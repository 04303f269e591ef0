"""The insertion check: its per-nodule measure by hand (a label laid over a vessel fails it, one at the point
passes), and the command end to end on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.insertion_check import label_placement, main, slice_spread_mm, summarise

SPACING = (2.0, 1.0, 1.0)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lung at −800 HU with a vessel (+40 HU) along k in columns 28–31; the point at (k, j, i) = (5, 20, 12)."""
    volume = np.full((11, 40, 40), -800.0)
    volume[:, 18:22, 28:32] = 40.0
    lung = np.ones(volume.shape, dtype=bool)
    return volume, lung, np.array([5.0, 20.0, 12.0])


def test_a_label_at_the_point_passes_and_one_over_the_vessel_fails() -> None:
    volume, lung, centre = _scene()
    slices = [3, 4, 5, 6, 7]
    at_point = np.zeros(volume.shape, dtype=bool)
    at_point[4:7, 18:23, 10:15] = True
    good = label_placement(at_point, volume, lung, centre, slices, SPACING)
    assert good["voxels"] == 75 and good["offset_mm"] == pytest.approx(0.0, abs=1e-9)
    assert good["tissue_share"] == 0.0 and good["ball_tissue_share"] == 0.0
    on_vessel = np.zeros(volume.shape, dtype=bool)
    on_vessel[4:7, 18:22, 28:32] = True
    bad = label_placement(on_vessel, volume, lung, centre, slices, SPACING)
    assert bad["offset_mm"] == pytest.approx(np.hypot(19.5 - 20.0, 29.5 - 12.0)) and bad["tissue_share"] == 1.0
    empty = label_placement(np.zeros(volume.shape, dtype=bool), volume, lung, centre, slices, SPACING)
    assert empty["voxels"] == 0 and np.isnan(empty["offset_mm"])
    summary = summarise([good, bad, empty])
    assert summary["empty_label_fraction"] == pytest.approx(1 / 3) and summary["mostly_on_tissue"] == 0.5
    assert summary["ball_mostly_on_tissue"] == 0.0


def test_slice_spread_is_nil_for_a_stacked_nodule_and_measures_a_sheared_one() -> None:
    volume, lung, centre = _scene()
    stacked = np.zeros(volume.shape, dtype=bool)
    stacked[3:8, 18:23, 10:15] = True
    assert label_placement(stacked, volume, lung, centre, [3, 4, 5, 6, 7], SPACING)["slice_spread_mm"] == 0.0
    sheared = np.zeros(volume.shape, dtype=bool)
    for step, k in enumerate(range(3, 8)):         # one column further on every slice: offsets −2 … +2 px
        sheared[k, 18:23, 10 + step : 15 + step] = True
    centroid = np.array([5.0, 20.0, 14.0])
    # equal areas: RMS of (−2, −1, 0, 1, 2) px × 1 mm
    assert slice_spread_mm(sheared, centroid, np.asarray(SPACING)) == pytest.approx(np.sqrt(2.0))
    rows = [label_placement(label, volume, lung, centre, [3, 4, 5, 6, 7], SPACING) for label in (stacked, sheared)]
    assert summarise(rows)["slice_spread_mm_median"] == pytest.approx(np.sqrt(2.0) / 2)


def test_command_on_the_bundled_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "check"
    assert main(["--out", str(out), "--cts", "1", "--points", "2", "--donors", "2", "--size", "128",
                 "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert len(result["rows"]) == 4 and result["overall"]["nodules"] == 4
    assert {r["module_class"] for r in result["rows"]} == {int(c) for c in result["by_class"]}
    assert "| all | 4 |" in (out / "report.md").read_text() and "4 nodules in" in capsys.readouterr().out
    assert result["slices"] == "±2"
    fitted = tmp_path / "fitted"
    assert main(["--out", str(fitted), "--cts", "1", "--points", "2", "--donors", "2", "--size", "128",
                 "--fit-slices", "--no-progress"]) == 0
    result = json.loads((fitted / "metrics.json").read_text())
    assert result["slices"] == "fitted to each nodule" and result["overall"]["nodules"] == 4
    assert "slices fitted to each nodule" in (fitted / "report.md").read_text()


def test_bad_counts_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--points", "0"])
    assert "--points must be ≥ 1" in capsys.readouterr().err
