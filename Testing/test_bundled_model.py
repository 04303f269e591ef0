"""The bundled demo model: present, intact (SHA-256 file), loadable, and it draws nodules inside the lung."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from RadiogenomicGANLib.insertion import NoduleInserter
from RadiogenomicGANLib.phantom import generate_patient
from RadiogenomicGANLib.weights import load_weights

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
WEIGHTS = RESOURCES / "demo_model.safetensors"
pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason="the bundled demo model is not committed yet")


def test_sha256_file_matches_the_bundled_files() -> None:
    listed = dict(line.split()[::-1] for line in (RESOURCES / "demo_model.sha256").read_text().splitlines())
    assert set(listed) == {"demo_model.safetensors", "demo_model.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((RESOURCES / name).read_bytes()).hexdigest() == digest, name


def test_loads_as_the_proposed_model_with_its_provenance() -> None:
    generator, metadata = load_weights(WEIGHTS, expected_kind="proposed")
    assert metadata.config.patch_size == 64 and len(metadata.gene_names) == metadata.config.num_genes
    assert WEIGHTS.stat().st_size < 20 * 2**20
    # the demo rebuilds the phantom cohort the model was trained on from these
    assert {"phantom_seed", "phantom_genes", "command", "seed"} <= set(metadata.provenance)
    assert sum(p.numel() for p in generator.parameters()) > 0


def test_draws_a_nodule_inside_the_lung() -> None:
    """A trained model (unlike a random one) makes a compact nodule mask on every requested slice."""
    inserter = NoduleInserter.from_weights(WEIGHTS, device="cpu")
    patient = generate_patient(3, seed=7, size_ij=256, n_genes=50)  # a realistic ~1.4 mm in-plane grid
    rng = np.random.default_rng(0)
    profile = rng.standard_normal(len(inserter.metadata.gene_names)).astype(np.float32)
    result = inserter.insert(patient.volume_hu, patient.geometry, profile, auto_count=1, half_slices=1, seed=1)
    label = result.label > 0
    per_slice = label.reshape(label.shape[0], -1).sum(axis=1)
    assert (per_slice > 0).sum() == 3, "the nodule is on exactly the three requested slices"
    spacing = patient.geometry.spacing
    area_mm2 = per_slice.max() * spacing[0] * spacing[1]
    assert 20.0 < area_mm2 < 2000.0, f"nodule cross-section {area_mm2:.0f} mm² is not nodule-sized"
    changed = result.volume_hu != patient.volume_hu
    assert changed.any() and np.all(changed.any(axis=(1, 2)) <= (per_slice > 0))
