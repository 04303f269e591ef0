"""Volume geometry: the IJK→RAS matrix that Slicer keeps on every volume node.

Arrays are indexed [k, j, i] (slice, row, column), as `slicer.util.arrayFromVolume` and SimpleITK return
them; geometry maps continuous (i, j, k) voxel coordinates to RAS millimetres. DICOM and ITK speak LPS,
so conversions live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class VolumeGeometry:
    """A 4×4 homogeneous IJK→RAS matrix with the conversions the pipeline needs."""

    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
            raise ValueError("IJK→RAS must be a 4×4 homogeneous matrix with last row 0 0 0 1")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
            raise ValueError("IJK→RAS matrix is singular (a zero spacing or parallel axes)")
        object.__setattr__(self, "ijk_to_ras", matrix)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_spacing(
        cls, spacing_ijk: Sequence[float], origin_ras: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> VolumeGeometry:
        """Axis-aligned RAS geometry (i → R, j → A, k → S), handy for tests."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.diag(np.asarray(spacing_ijk, dtype=np.float64))
        matrix[:3, 3] = origin_ras
        return cls(matrix)

    @classmethod
    def from_lps(
        cls,
        origin_lps: Sequence[float],
        spacing_ijk: Sequence[float],
        direction_lps: np.ndarray | Sequence[float],
    ) -> VolumeGeometry:
        """From DICOM/ITK terms: origin and 3×3 direction (columns = i, j, k unit axes) in LPS."""
        direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing_ijk, dtype=np.float64))
        matrix[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=np.float64)
        return cls(matrix)

    def to_lps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin_lps, spacing_ijk, direction_lps 3×3 with unit columns) for DICOM/ITK writers."""
        spacing = self.spacing
        direction_ras = self.ijk_to_ras[:3, :3] / spacing
        return LPS_TO_RAS @ self.ijk_to_ras[:3, 3], spacing, LPS_TO_RAS @ direction_ras

    # --- properties ---------------------------------------------------------------------------------
    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Voxel size in array-axis order, for `scipy.ndimage` `sampling=` on [k, j, i] arrays."""
        sx, sy, sz = self.spacing
        return float(sz), float(sy), float(sx)

    @property
    def slice_normal_ras(self) -> np.ndarray:
        """Unit vector along k (the slice stacking direction) in RAS."""
        axis = self.ijk_to_ras[:3, 2]
        return axis / np.linalg.norm(axis)

    # --- point conversions ------------------------------------------------------------------------------
    def ijk_to_ras_points(self, ijk: np.ndarray | Sequence[float]) -> np.ndarray:
        points = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return points @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray | Sequence[float]) -> np.ndarray:
        points = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inverse = self.ras_to_ijk
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def kji_to_ras(self, kji: np.ndarray | Sequence[float]) -> np.ndarray:
        return self.ijk_to_ras_points(np.atleast_2d(np.asarray(kji, dtype=np.float64))[:, ::-1])

    def ras_to_kji(self, ras: np.ndarray | Sequence[float]) -> np.ndarray:
        return self.ras_to_ijk_points(ras)[:, ::-1]
