"""What a synthetic-nodule segment is — name, colour, terminology and provenance tags — in one place.

The `.seg.nrrd`/DICOM writers (`volume_io`) and the MRML adapter both build their segments from
`nodule_segments`, so a segmentation made by the CLI and one made by the module carry identical names,
colours, terminology and tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SEGMENT_NAME = "Synthetic nodule {n}"
SEGMENT_ID = "Synthetic_nodule_{n}"

#: Slicer terminology string (context~category~type~modifier~anatomic context~region~region modifier):
#: Morphologically altered structure / Nodule (SCT 27925004, a type of Slicer's DICOM master list), in the lung.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY_CODE = ("SCT", "49755003", "Morphologically Altered Structure")
TYPE_CODE = ("SCT", "27925004", "Nodule")
REGION_CODE = ("SCT", "39607008", "Lung")


def _code(code: tuple[str, str, str]) -> str:
    return "^".join(code)


NODULE_TERMINOLOGY = (
    f"{TERMINOLOGY_CONTEXT}~{_code(CATEGORY_CODE)}~{_code(TYPE_CODE)}~^^"
    f"~{ANATOMIC_CONTEXT}~{_code(REGION_CODE)}~^^"
)

#: Distinct, colour-blind-friendly colours (Okabe–Ito) for nodules 1, 2, … (cycled).
SEGMENT_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.902, 0.624, 0.000),
    (0.337, 0.706, 0.914),
    (0.000, 0.620, 0.451),
    (0.941, 0.894, 0.259),
    (0.000, 0.447, 0.698),
    (0.835, 0.369, 0.000),
    (0.800, 0.475, 0.655),
)

TAG_PREFIX = "RadiogenomicGAN."
TAG_SYNTHETIC = TAG_PREFIX + "Synthetic"
TAG_PROVENANCE = TAG_PREFIX + "Provenance"
TAG_MODEL = TAG_PREFIX + "Model"
TAG_GENE_SAMPLE = TAG_PREFIX + "GeneSample"
TAG_SEED = TAG_PREFIX + "Seed"
TAG_NODULE_INDEX = TAG_PREFIX + "NoduleIndex"


@dataclass
class SegmentInfo:
    """One segment: label value in the labelmap plus what Slicer shows."""

    label_value: int
    name: str
    colour: tuple[float, float, float]
    segment_id: str = ""
    terminology: str = NODULE_TERMINOLOGY
    tags: dict[str, str] = field(default_factory=dict)


def provenance_tags(provenance: Mapping[str, Any]) -> dict[str, str]:
    """Tags marking a segment synthetic, with the model, gene sample, seed and the whole provenance."""
    sample = provenance.get("gene_sample")
    if isinstance(sample, Mapping):
        sample = json.dumps(sample, sort_keys=True)
    return {
        TAG_SYNTHETIC: "true",
        TAG_MODEL: str(provenance.get("weights_file") or provenance.get("model_kind") or "unknown"),
        TAG_GENE_SAMPLE: "" if sample is None else str(sample),
        TAG_SEED: str(provenance.get("seed", "")),
        TAG_PROVENANCE: json.dumps(dict(provenance), sort_keys=True, separators=(",", ":"), default=str),
    }


def nodule_segments(count: int, provenance: Mapping[str, Any] | None = None) -> list[SegmentInfo]:
    """Segments "Synthetic nodule 1…n" (label n), tagged synthetic with the provenance."""
    tags = provenance_tags(provenance or {})
    return [
        SegmentInfo(
            label_value=n,
            name=SEGMENT_NAME.format(n=n),
            colour=SEGMENT_COLOURS[(n - 1) % len(SEGMENT_COLOURS)],
            segment_id=SEGMENT_ID.format(n=n),
            tags={**tags, TAG_NODULE_INDEX: str(n)},
        )
        for n in range(1, count + 1)
    ]


def empty_nodule_note(empty: Sequence[int]) -> str:
    """One line telling the user which nodules (1-based) came out without a labelled voxel; '' for none.

    The generator can draw nothing at a point for some profiles (the smallest nodules most often); the
    nodule's segment is then empty and the CT unchanged there, which a user would otherwise only find by
    looking.
    """
    if not empty:
        return ""
    which = ", ".join(str(n) for n in empty)
    noun = "nodule" if len(empty) == 1 else "nodules"
    return (f"{noun} {which} came out empty: the model drew nothing there for this gene profile, so the CT is "
            "unchanged there and the segment has no voxels. Try another point, seed or slice range.")
