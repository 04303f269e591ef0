"""Radiogenomic phantom cohort: procedural chest CTs whose nodules are driven by latent gene modules.

Written in the real NSCLC-Radiogenomics on-disk formats (TCIA tree, DICOM CT + SEG, GEO RNA-seq table)
with a known gene→image truth (`ground_truth.csv`), so the readers and the paper's claim can be tested.
"""

from .patient import PhantomPatient, generate_patient, patient_id_for
from .writers import CohortSummary, write_cohort

__all__ = ["CohortSummary", "PhantomPatient", "generate_patient", "patient_id_for", "write_cohort"]
