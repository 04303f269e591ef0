"""Radiogenomic phantom cohort: procedural chest CTs whose nodules are driven by latent gene modules.

Why: the real NSCLC-Radiogenomics download cannot be fetched here, and its gene→image link is unknown. The
phantom is written in exactly the real on-disk formats (TCIA tree, DICOM CT + SEG in both real variants,
``metadata.csv``, GEO RNA-seq table) so the readers are exercised end to end, and it carries a known
gene→image truth (``ground_truth.csv``, ``ground_truth_genes.csv``) so the paper's claim becomes measurable.

Pieces (one file per concern):
- `anatomy`  — body, fat, muscle, ribs, spine, table/padding, two separate lungs, vessel and airway trees.
- `nodule`   — the documented module → phenotype map and the nodule's rasterisation.
- `genomics` — classes (clusters) → module activations → gene profile (linear FPKM, zeros, ``NA``).
- `patient`  — `generate_patient`: acquisition geometry + all of the above for one patient.
- `writers`  — `write_cohort`: the files; ``python -m RadiogenomicGANLib.phantom`` is its CLI.

Truth in one line per module (details in `nodule` and `genomics`): module 1 → diameter (10–40 mm),
module 2 → solid fraction (solid 0–60 HU core in a −750…−600 HU ground-glass nodule), module 3 → margin blur
and spiculation, module 4 → lobulation. Classes set modules 1–3 (orthogonal prototypes ±1, noise 0.3);
module 4 is class-free N(0, 1).
"""

from typing import Any

from .patient import PhantomPatient, generate_patient, patient_id_for


def __getattr__(name: str) -> Any:
    """The writers on first use: they import highdicom (pydicom ≥ 3), which the Slicer module's in-memory
    phantom (Sample Data) must not need — Slicer 5.10 bundles pydicom 2.4 and no highdicom."""
    if name in ("CohortSummary", "write_cohort"):
        from . import writers

        return getattr(writers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CohortSummary", "PhantomPatient", "generate_patient", "patient_id_for", "write_cohort"]
