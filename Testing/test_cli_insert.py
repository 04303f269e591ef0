"""`python -m RadiogenomicGANLib insert` end to end on phantom files of different orientation and spacing.

The outputs must overlay the input exactly (same geometry), the segmentation must carry Slicer's segment
fields, the DICOM SEG must reference the input series, and every bad input must end with exit status 2,
one clear message and no output file at all.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_insertion_support import NUM_GENES, DiscMaskGenerator, make_generator, make_metadata, small_config

from RadiogenomicGANLib import cli
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.networks import build_generator
from RadiogenomicGANLib.request import RequestError
from RadiogenomicGANLib.volume_io import write_volume

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
SAMPLES = ["R01-001", "R01-002", "R01-003"]


def _flip(array: np.ndarray, geometry: VolumeGeometry, axes_kji: tuple[int, ...]) -> tuple[np.ndarray, VolumeGeometry]:
    """The same anatomy stored with the given array axes reversed, and the geometry that says so."""
    matrix = geometry.ijk_to_ras.copy()
    for axis in axes_kji:
        column = 2 - axis  # array axis k, j, i ↔ matrix column 2, 1, 0
        matrix[:3, 3] += matrix[:3, column] * (array.shape[axis] - 1)
        matrix[:3, column] *= -1
    return np.flip(array, axes_kji).copy(), VolumeGeometry(matrix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Phantom CTs as NRRD (i, j reversed), NIfTI (k reversed, other spacing), DICOM; gene table; weights."""
    from RadiogenomicGANLib.phantom import generate_patient, write_cohort
    from RadiogenomicGANLib.phantom.writers import write_geo_table
    from RadiogenomicGANLib.weights import save_weights

    root = tmp_path_factory.mktemp("cli")
    patients = [generate_patient(n, 7, size_ij=128, slices=24, spacing=(2.5, 4.0), n_genes=64) for n in range(3)]
    phantom = patients[0]
    other = generate_patient(1, 3, size_ij=96, slices=20, spacing=(3.2, 5.0), n_genes=64)

    volume, geometry = _flip(phantom.volume_hu, phantom.geometry, (1, 2))
    write_volume(root / "ct_ras.nrrd", volume, geometry)
    volume2, geometry2 = _flip(other.volume_hu, other.geometry, (0,))
    write_volume(root / "ct_flipk.nii.gz", volume2, geometry2)
    write_cohort(root / "dicom", [phantom], decoy_fraction=0.0, without_seg=[0])

    values = np.stack([p.genes_fpkm for p in patients], axis=1)
    write_geo_table(root / "genes.txt", phantom.gene_names, SAMPLES, values)
    complete = [g for g, row in zip(phantom.gene_names, values) if np.isfinite(row).all()][:NUM_GENES]
    config = small_config()
    save_weights(root / "model", make_generator(), make_metadata(config, complete))
    missing = [*complete[:-3], "NOTAGENE1", "NOTAGENE2", "NOTAGENE3"]
    save_weights(root / "model_missing", make_generator(), make_metadata(config, missing))
    mostly = [*complete[:2], *[f"NOTAGENE{n}" for n in range(NUM_GENES - 2)]]
    save_weights(root / "model_mostly_missing", make_generator(), make_metadata(config, mostly))
    bigger = dataclasses.replace(small_config(), base_channels=8)
    torch.manual_seed(0)
    save_weights(root / "model_big", build_generator(bigger).eval(), make_metadata(bigger, complete))
    return {
        "root": root,
        "phantom": phantom,
        "other": other,
        "nrrd": root / "ct_ras.nrrd",
        "nifti": root / "ct_flipk.nii.gz",
        "dicom": root / "dicom",
        "genes": root / "genes.txt",
        "weights": root / "model.safetensors",
        "weights_missing": root / "model_missing.safetensors",
        "weights_mostly_missing": root / "model_mostly_missing.safetensors",
        "weights_big": root / "model_big.safetensors",
        "ras_geometry": geometry,
        "ras_lung": np.flip(phantom.lung_mask, (1, 2)),
    }


@pytest.fixture
def disc_model(monkeypatch):  # type: ignore[no-untyped-def]
    """Loaded generators draw a disc nodule (a random model's mask is empty); the CLI path is unchanged."""
    import RadiogenomicGANLib.weights as weights

    real = weights.load_weights

    def load(path, **kwargs):  # type: ignore[no-untyped-def]
        generator, metadata = real(path, **kwargs)
        return DiscMaskGenerator(generator), metadata

    monkeypatch.setattr(weights, "load_weights", load)


def _lung_centre_ras(lung: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(lung, sampling=geometry.spacing_kji)
    distance[:4] = distance[-4:] = 0
    return geometry.kji_to_ras([np.unravel_index(np.argmax(distance), distance.shape)])[0]


def _csv(point: np.ndarray) -> str:
    return ",".join(f"{v:.3f}" for v in point)


def _base_args(data, out: Path, ct: Path | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        "insert", "--ct", str(ct or data["nrrd"]), "--genes", str(data["genes"]), "--sample", SAMPLES[1],
        "--weights", str(data["weights"]), "--out-volume", str(out / "new.nrrd"),
        "--out-segmentation", str(out / "new.seg.nrrd"), "--quiet", "--device", "cpu",
    ]


def _same_geometry(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    np.testing.assert_allclose(ia.GetOrigin(), ib.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ia.GetSpacing(), ib.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(ia.GetDirection(), ib.GetDirection(), atol=1e-6)


def test_nrrd_with_ras_storage(data, tmp_path, disc_model, capsys) -> None:  # type: ignore[no-untyped-def]
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    args = [*_base_args(data, tmp_path), "--center-ras", _csv(centre), "--slices", "±1",
            "--out-weight-map", str(tmp_path / "w.nrrd"), "--seed", "4"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "nodule 1" in printed and "new.seg.nrrd" in printed
    _same_geometry(data["nrrd"], tmp_path / "new.nrrd")
    _same_geometry(data["nrrd"], tmp_path / "w.nrrd")
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(data["nrrd"])))
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "new.nrrd")))
    assert after.dtype == before.dtype
    k = int(np.rint(data["ras_geometry"].ras_to_kji([centre])[0, 0]))
    changed = np.flatnonzero((after != before).any(axis=(1, 2)))
    assert changed.size and set(changed) <= {k - 1, k, k + 1}

    label, header = nrrd.read(str(tmp_path / "new.seg.nrrd"), index_order="C")
    assert label.shape == before.shape and set(np.unique(label)) == {0, 1}
    assert set(np.flatnonzero(label.any(axis=(1, 2)))) == {k - 1, k, k + 1}
    assert not (label.astype(bool) & ~data["ras_lung"]).any()
    assert header["Segment0_Name"] == "Synthetic nodule 1" and header["Segment0_LabelValue"] == "1"
    assert len(header["Segment0_Color"].split()) == 3 and header["Segment0_Layer"] == "0"
    assert "TerminologyEntry:Segmentation category and type" in header["Segment0_Tags"]
    assert "SCT^27925004^Nodule" in header["Segment0_Tags"] and "RadiogenomicGAN.Synthetic:true" in header[
        "Segment0_Tags"]
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    # the label sits where it was asked for: its centroid is the centre's projection, within a voxel or two
    kji = np.argwhere(label == 1)
    centroid = data["ras_geometry"].kji_to_ras([kji[kji[:, 0] == k].mean(axis=0)])[0]
    assert np.linalg.norm((centroid - centre)[:2]) < 2 * 2.5
    assert not list(tmp_path.glob(".*partial*"))


def test_an_empty_nodule_is_named_on_stderr(data, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The untrained test model draws no mask: the run still succeeds, and says which nodule is empty."""
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    assert cli.main([*_base_args(data, tmp_path), "--center-ras", _csv(centre), "--slices", "±1"]) == 0
    printed = capsys.readouterr()
    assert "0 labelled voxels" in printed.out
    assert "warning: nodule 1 came out empty" in printed.err and "Try another point, seed or slice range" in printed.err
    label, _ = nrrd.read(str(tmp_path / "new.seg.nrrd"), index_order="C")
    assert not label.any()


def test_segmentation_loads_in_slicer(data, tmp_path, disc_model) -> None:  # type: ignore[no-untyped-def]
    """slicer-core's own storage node reads names, colours and terminology back."""
    slicer = pytest.importorskip("slicer")
    import vtk

    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    assert cli.main([*_base_args(data, tmp_path), "--center-ras", _csv(centre), "--half-slices", "0"]) == 0
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "new.seg.nrrd"))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(segmentation.GetNthSegmentID(0))
    assert segment.GetName() == "Synthetic nodule 1"
    terminology = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", terminology) and "Nodule" in str(terminology)


def test_nifti_reversed_slices_automatic(data, tmp_path, disc_model) -> None:  # type: ignore[no-untyped-def]
    out_volume = tmp_path / "new.nii.gz"
    args = [*_base_args(data, tmp_path, data["nifti"]), "--auto", "2", "--slices", "±1", "--seed", "1"]
    args[args.index("--out-volume") + 1] = str(out_volume)
    assert cli.main(args) == 0
    _same_geometry(data["nifti"], out_volume)
    label, header = nrrd.read(str(tmp_path / "new.seg.nrrd"), index_order="C")
    assert set(np.unique(label)) <= {0, 1, 2} and header["Segment1_Name"] == "Synthetic nodule 2"
    for value in (1, 2):
        assert 1 <= len(np.flatnonzero((label == value).any(axis=(1, 2)))) <= 3


def test_dicom_series_with_dicom_seg(data, tmp_path, disc_model) -> None:  # type: ignore[no-untyped-def]
    import highdicom as hd

    from RadiogenomicGANLib.dicom_io import read_ct_series, read_seg_mask

    ct = read_ct_series(data["dicom"])
    centre = _lung_centre_ras(data["phantom"].lung_mask, ct.geometry)
    seg_path = tmp_path / "nodules_seg.dcm"
    args = [*_base_args(data, tmp_path, data["dicom"]), "--center-ras", _csv(centre), "--slices", "±1",
            "--out-dicom-seg", str(seg_path)]
    assert cli.main(args) == 0
    out = sitk.ReadImage(str(tmp_path / "new.nrrd"))
    geometry = VolumeGeometry.from_lps(out.GetOrigin(), out.GetSpacing(), np.reshape(out.GetDirection(), (3, 3)))
    np.testing.assert_allclose(geometry.ijk_to_ras, ct.geometry.ijk_to_ras, atol=1e-4)

    seg = hd.seg.segread(str(seg_path))
    assert seg.SeriesDescription == "Synthetic nodules (RadiogenomicGAN)" and seg.ContentLabel == "SYNTHETIC"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert seg.StudyInstanceUID == ct.study_uid
    description = seg.SegmentSequence[0]
    assert description.SegmentAlgorithmType == "AUTOMATIC" and description.SegmentAlgorithmName == "RadiogenomicGAN"
    modifier = description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeValue == "SYNTHETIC"
    label, _ = nrrd.read(str(tmp_path / "new.seg.nrrd"), index_order="C")
    assert np.array_equal(read_seg_mask(seg_path, ct), label > 0)


def test_entry_point_in_a_subprocess(data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real `python -m` entry with the real (random, so nodule-less) model: exit 0 and the files."""
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    args = [sys.executable, "-m", "RadiogenomicGANLib", *_base_args(data, tmp_path), "--center-ras", _csv(centre)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new.nrrd").exists() and (tmp_path / "new.seg.nrrd").exists()
    args[args.index("--sample") + 1] = "R01-999"
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "R01-999" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- bad input: exit 2, one clear message, nothing written ------------------------------------------------
def _bad_case(data, out: Path, case: str, monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    args = [*_base_args(data, out), "--center-ras", _csv(centre)]

    def set_arg(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    root = data["root"]
    if case == "2d":
        path = root / "slice.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(data["phantom"].volume_hu[10]), str(path))
        set_arg("--ct", str(path))
    elif case == "not_ct":
        path = root / "eight_bit.nrrd"
        eight = ((data["phantom"].volume_hu.astype(np.float32) + 1024) / 16).clip(0, 255).astype(np.uint8)
        write_volume(path, eight, data["phantom"].geometry)
        set_arg("--ct", str(path))
    elif case == "outside_volume":
        set_arg("--center-ras", "900,900,900")
    elif case == "outside_lung":
        body = np.flip(data["phantom"].body_mask & ~data["phantom"].lung_mask, (1, 2)).copy()
        body[:4] = body[-4:] = False
        points = np.argwhere(body)
        set_arg("--center-ras", _csv(data["ras_geometry"].kji_to_ras([points[len(points) // 2]])[0]))
    elif case == "slices":
        args += ["--slices", "5,6,500"]
    elif case == "unknown_sample":
        set_arg("--sample", "R01-999")
    elif case == "missing_genes":
        set_arg("--weights", str(data["weights_missing"]))
    elif case == "other_architecture":
        # the tensors of a wider network under a JSON that describes the small one
        path = root / "mixed"
        path.with_suffix(".safetensors").write_bytes(data["weights_big"].read_bytes())
        record = json.loads(data["weights_big"].with_suffix(".json").read_text())
        record["architecture"]["base_channels"] = 4
        path.with_suffix(".json").write_text(json.dumps(record))
        set_arg("--weights", str(path.with_suffix(".safetensors")))
    elif case == "corrupt_weights":
        path = root / "corrupt"
        path.with_suffix(".safetensors").write_bytes(b"\x00garbage" * 100)
        path.with_suffix(".json").write_bytes(data["weights"].with_suffix(".json").read_bytes())
        set_arg("--weights", str(path.with_suffix(".safetensors")))
    elif case == "no_default_weights":
        index = args.index("--weights")
        del args[index : index + 2]
        monkeypatch.setattr(cli, "DEFAULT_WEIGHTS", root / "nowhere" / "demo_model.safetensors")
    elif case == "bad_suffix":
        set_arg("--out-volume", str(out / "new.png"))
    elif case == "dicom_seg_without_dicom":
        args += ["--out-dicom-seg", str(out / "seg.dcm")]
    elif case == "blend_weight":
        args += ["--blend-with", SAMPLES[2], "--blend-weight", "1.5"]
    elif case == "bad_centre":
        set_arg("--center-ras", "1,2")
    # issue 11
    elif case == "dicom_seg_onto_an_input_slice":
        set_arg("--ct", str(data["dicom"]))
        args += ["--out-dicom-seg", str(next(data["dicom"].rglob("*.dcm")))]
    elif case == "volume_into_the_dicom_folder":
        set_arg("--ct", str(data["dicom"]))
        set_arg("--out-volume", str(data["dicom"] / "new.nrrd"))
    elif case == "nan_on_an_odd_slice":
        path = root / "nan_odd.nrrd"
        volume = np.flip(data["phantom"].volume_hu, (1, 2)).astype(np.float32)
        volume[13] = np.nan
        write_volume(path, volume, data["ras_geometry"])
        set_arg("--ct", str(path))
    elif case == "slices_too_many":
        args += ["--slices", "0-99999999999"]
    elif case == "half_slices_too_many":
        set_arg("--center-ras", _csv(centre))
        args += ["--half-slices", "99999999999"]
    elif case == "slices_pm1000":
        args += ["--slices", "±1000"]
    elif case == "impute_nearly_all":
        set_arg("--weights", str(data["weights_mostly_missing"]))
        args.append("--impute-missing-genes")
    elif case == "pickle_weights":
        path = root / "x.pt"
        torch.save({"w": torch.zeros(2)}, path)
        set_arg("--weights", str(path))
    elif case == "fractional_width":
        path = root / "fractional"
        path.with_suffix(".safetensors").write_bytes(data["weights"].read_bytes())
        record = json.loads(data["weights"].with_suffix(".json").read_text())
        record["architecture"]["base_channels"] = 16.5
        path.with_suffix(".json").write_text(json.dumps(record))
        set_arg("--weights", str(path.with_suffix(".safetensors")))
    elif case == "reversed_gene_names":
        path = root / "reversed"
        path.with_suffix(".safetensors").write_bytes(data["weights"].read_bytes())
        record = json.loads(data["weights"].with_suffix(".json").read_text())
        record["gene_names"] = record["gene_names"][::-1]
        path.with_suffix(".json").write_text(json.dumps(record))
        set_arg("--weights", str(path.with_suffix(".safetensors")))
    elif case == "seed_negative":
        args += ["--seed", "-5"]
    elif case == "seed_huge":
        args += ["--seed", str(2**70)]
    elif case == "threads_huge":
        args += ["--threads", "100000"]
    elif case == "series_uid_on_a_file":
        args += ["--series-uid", "1.2.3"]
    elif case == "centre_far_away":
        set_arg("--center-ras", "1e308,1e308,1e308")
    return args


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`: the inputs must come out of a refused run unchanged."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("2d", "2D"),
        ("not_ct", "Hounsfield"),
        ("outside_volume", "outside the volume"),
        ("outside_lung", "not in the lung"),
        ("slices", "out of range"),
        ("unknown_sample", "R01-999"),
        ("missing_genes", "3 of 24 model genes are missing"),
        ("other_architecture", "differ in shape"),
        ("corrupt_weights", "not a safetensors"),
        ("no_default_weights", "bundled demo model"),
        ("bad_suffix", "must end with"),
        ("dicom_seg_without_dicom", "DICOM input"),
        ("blend_weight", "blend weight"),
        ("bad_centre", "three numbers"),
        # issue 11: each of these once overwrote an input, printed a traceback or a 10 KB line, or ran out of memory
        ("dicom_seg_onto_an_input_slice", "inside the input folder"),
        ("volume_into_the_dicom_folder", "inside the input folder"),
        ("nan_on_an_odd_slice", "NaN or infinite values (first in slice 13)"),
        ("slices_too_many", "more slices than any CT has"),
        ("half_slices_too_many", "--half-slices must be between"),
        ("slices_pm1000", "out of range"),
        ("impute_nearly_all", "imputing more than 50 %"),
        ("pickle_weights", "zip archive"),
        ("fractional_width", "'base_channels' must be an integer"),
        ("reversed_gene_names", "changed after export"),
        ("seed_negative", "--seed must be between"),
        ("seed_huge", "--seed must be between"),
        ("threads_huge", "--threads must be between"),
        ("series_uid_on_a_file", "--series-uid picks a series"),
        ("centre_far_away", "outside the volume"),
    ],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a numpy warning would be a second stderr line
def test_bad_input(data, tmp_path, monkeypatch, capsys, case, message) -> None:  # type: ignore[no-untyped-def]
    """The bad-input table: exit 2, one clear line, nothing written, every input unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    args = _bad_case(data, out, case, monkeypatch)
    before = _snapshot(data["root"])
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error, error
    assert len(error.splitlines()) == 1 and len(error) < 600, error
    assert list(out.iterdir()) == [], "an output was written for bad input"
    assert _snapshot(data["root"]) == before, "an input was changed"


def test_impute_missing_genes(data, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Imputation is said on stderr and recorded in the output's provenance (it once was silent)."""
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    args = [*_base_args(data, tmp_path), "--center-ras", _csv(centre), "--weights", str(data["weights_missing"]),
            "--impute-missing-genes"]
    assert cli.main(args) == 0
    assert "3 of 24 model genes were missing" in capsys.readouterr().err
    provenance = json.loads(sitk.ReadImage(str(tmp_path / "new.nrrd")).GetMetaData("RadiogenomicGAN_Provenance"))
    assert provenance["imputed_genes"] == 3


def test_a_killed_runs_partial_files_are_removed(data, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A killed insert leaves hidden .partial files; the next run into the same outputs removes them. Without a
    slice option the nodule is fitted to its size, as in the module."""
    import os
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".{int(dead.stdout)}-0badf00d.partial.new.nrrd"
    leftover.write_bytes(b"half a volume")
    an_hour_ago = time.time() - 3600
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    assert cli.main([*_base_args(data, tmp_path), "--center-ras", _csv(centre)]) == 0
    assert "(fitted to its size)" in capsys.readouterr().out
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.nrrd", "new.seg.nrrd"]


def test_write_failure_is_one_message_without_traceback(data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A full disk (here: the file size limit, ulimit -f) while writing: exit 2, one line, no partial file."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "RadiogenomicGANLib", *_base_args(data, out), "--center-ras", _csv(centre)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error:") and "new.nrrd" in done.stderr, done.stderr
    assert list(out.iterdir()) == []


def test_missing_genes_message_names_the_cli_flag(data, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    args = [*_base_args(data, tmp_path), "--center-ras", _csv(centre), "--weights", str(data["weights_missing"])]
    assert cli.main(args) == 2
    assert "--impute-missing-genes" in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(data, tmp_path, disc_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import RadiogenomicGANLib.volume_io as volume_io

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise volume_io.VolumeIOError("disk full (simulated)")

    monkeypatch.setattr(volume_io, "write_segmentation", broken)
    out = tmp_path / "out"
    out.mkdir()
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    assert cli.main([*_base_args(data, out), "--center-ras", _csv(centre)]) == 2
    assert list(out.iterdir()) == []


def test_slice_specs() -> None:
    assert cli.parse_slices("±2") == 2 and cli.parse_slices("+-3") == 3
    assert cli.parse_slices("10,11,12") == [10, 11, 12] and cli.parse_slices("4-6,9") == [4, 5, 6, 9]
    assert cli.parse_slices("3 4") == [3, 4] and cli.parse_slices("45 - 47") == [45, 46, 47]
    with pytest.raises(RequestError):
        cli.parse_slices("a,b")
    geometry = VolumeGeometry.from_spacing([1.0, 1.0, 2.0])
    plans = cli.plan_slices(["±1", "7,8"], np.array([[0, 0, 10.0], [0, 0, 2.0]]), geometry, 2)
    assert plans == [[4, 5, 6], [7, 8]]
    assert cli.plan_slices(None, np.array([[0, 0, 10.0]]), geometry, 2) == [[3, 4, 5, 6, 7]]


def test_an_unwritable_output_folder_fails_before_the_generator_runs(data, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A read-only folder once failed with a traceback after the generator had run. (Root ignores permission
    bits, so the probe's refusal is simulated; the probe itself is tested in test_atomic.py.)"""
    def read_only(folder):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", str(folder))

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the generator ran before the output folder was checked")

    monkeypatch.setattr(cli, "check_writable", read_only)
    from RadiogenomicGANLib.insertion import NoduleInserter

    monkeypatch.setattr(NoduleInserter, "insert", never)
    centre = _lung_centre_ras(data["ras_lung"], data["ras_geometry"])
    assert cli.main([*_base_args(data, tmp_path), "--center-ras", _csv(centre)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {tmp_path}: Permission denied"


def test_a_cropped_ct_whose_lung_touches_the_border(data, tmp_path, disc_model) -> None:  # type: ignore[no-untyped-def]
    """A CT cropped around one lung (Slicer's Crop Volume) once gave 'no lung found', even with a centre in the
    lung: now the lung is found and the nodule is inserted, without --allow-outside-lung."""
    phantom = data["phantom"]
    _, _, columns = np.nonzero(phantom.lung_mask)
    start = (columns.min() + columns.max()) // 2 - 5
    matrix = phantom.geometry.ijk_to_ras.copy()
    matrix[:3, 3] += matrix[:3, 0] * start
    geometry = VolumeGeometry(matrix)
    lung = phantom.lung_mask[:, :, start:]
    assert lung[:, :, 0].any(), "the crop cuts through the lung"
    write_volume(tmp_path / "cropped.nrrd", np.ascontiguousarray(phantom.volume_hu[:, :, start:]), geometry)
    centre = _lung_centre_ras(lung, geometry)
    args = [*_base_args(data, tmp_path, tmp_path / "cropped.nrrd"), "--center-ras", _csv(centre), "--slices", "±1"]
    assert cli.main(args) == 0
    label, _ = nrrd.read(str(tmp_path / "new.seg.nrrd"), index_order="C")
    assert label.any()
