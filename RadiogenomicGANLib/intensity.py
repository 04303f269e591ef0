"""The HU window the networks see (the design choice stored with the weights): [-1000, 500] HU ↔ [-1, 1]."""

from __future__ import annotations

import numpy as np

HU_WINDOW: tuple[float, float] = (-1000.0, 500.0)


def hu_to_unit(hu: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """Clip to the window and map linearly to [-1, 1] (float32)."""
    low, high = window
    clipped = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return (2.0 * (clipped - low) / (high - low) - 1.0).astype(np.float32)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """Inverse of `hu_to_unit` inside the window (float32)."""
    low, high = window
    return ((np.asarray(unit, dtype=np.float32) + 1.0) * 0.5 * (high - low) + low).astype(np.float32)
