"""Colour differences (CIEDE2000) and conversions, all via colour-science. Targets are parsed
in the kernel (labbus.events.colour_target), since entry points parse them too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labbus.events.colour_target import (  # noqa: F401 - the colour maths' one import place
    D65,
    TargetError,
    colour,
    parse_target,
    srgb8_to_lab,
    srgb_to_lab,
)


def delta_e2000(lab_1: Sequence[float] | np.ndarray,
                lab_2: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """CIEDE2000 colour difference; broadcasts over (..., 3) arrays."""
    result = colour.delta_E(np.asarray(lab_1, dtype=float), np.asarray(lab_2, dtype=float),
                            method="CIE 2000")
    return float(result) if np.ndim(result) == 0 else result


def lab_to_srgb(lab: Sequence[float] | np.ndarray) -> np.ndarray:
    """CIELAB (D65) → sRGB in 0..1, unclipped (values outside 0..1 mean out of the sRGB gamut)."""
    return colour.XYZ_to_sRGB(colour.Lab_to_XYZ(np.asarray(lab, dtype=float), D65))
