"""What a colour campaign asks for: a target colour (hex, rgb(), lab() or a triple) as CIELAB
(D65), and the ExperimentRequested every entry point (the CLI, the command gateway) makes of it.
Conversions via colour-science."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Sequence

import numpy as np

from labbus.events.model import Actor, ExperimentRequested

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # colour-science warns that matplotlib is absent
    import colour

D65 = colour.CCS_ILLUMINANTS["CIE 1931 2 Degree Standard Observer"]["D65"]

_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")
_FUNCTIONAL = re.compile(r"^(lab|rgb)\(([^)]*)\)$", re.IGNORECASE)


class TargetError(ValueError):
    """A colour target could not be understood; the message says why."""


def srgb_to_lab(srgb: Sequence[float] | np.ndarray) -> np.ndarray:
    """sRGB in 0..1 (gamma-encoded) → CIELAB (D65)."""
    return colour.XYZ_to_Lab(colour.sRGB_to_XYZ(np.asarray(srgb, dtype=float)), D65)


def srgb8_to_lab(rgb8: Sequence[float] | np.ndarray) -> np.ndarray:
    return srgb_to_lab(np.asarray(rgb8, dtype=float) / 255.0)


def parse_target(value: str | Sequence[float], space: str = "lab") -> np.ndarray:
    """A colour target as CIELAB (D65).

    Accepts '#7a3cc0' / '7a3cc0' / '#73c', 'rgb(122, 60, 192)', 'lab(50, 20, -30)',
    or a triple interpreted in `space`: "lab" (default), "srgb8" (0..255) or "srgb" (0..1).
    """
    if isinstance(value, str):
        text = value.strip()
        hex_match = _HEX.match(text)
        if hex_match:
            digits = hex_match.group(1)
            if len(digits) == 3:
                digits = "".join(d * 2 for d in digits)
            return srgb8_to_lab([int(digits[i:i + 2], 16) for i in (0, 2, 4)])
        functional = _FUNCTIONAL.match(text.replace(" ", ""))
        if functional:
            return parse_target(_numbers(functional.group(2), value),
                                space="lab" if functional.group(1).lower() == "lab" else "srgb8")
        raise TargetError(f"target {value!r}: expected '#rrggbb', 'rgb(r, g, b)' or 'lab(L, a, b)'")

    triple = _triple(value)
    if space == "lab":
        if not 0.0 <= triple[0] <= 100.0:
            raise TargetError(f"target {tuple(value)}: L* must be between 0 and 100")
        return triple
    if space == "srgb8":
        if np.any(triple < 0) or np.any(triple > 255):
            raise TargetError(f"target {tuple(value)}: 8-bit sRGB values must be between 0 and 255")
        return srgb8_to_lab(triple)
    if space == "srgb":
        if np.any(triple < 0) or np.any(triple > 1):
            raise TargetError(f"target {tuple(value)}: sRGB values must be between 0 and 1")
        return srgb_to_lab(triple)
    raise TargetError(f"unknown colour space {space!r}: use 'lab', 'srgb8' or 'srgb'")


def _numbers(text: str, original: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise TargetError(f"target {original!r}: components must be numbers") from None


def _triple(value: Sequence[float]) -> np.ndarray:
    try:
        triple = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise TargetError(f"target {value!r}: expected three numbers") from None
    if triple.shape != (3,) or not np.all(np.isfinite(triple)):
        raise TargetError(f"target {value!r}: expected three finite numbers")
    return triple


def request_experiment(target: str, budget: int, batch: int, dyes: Sequence[str],
                       requested_by: str, tolerance: float = 2.0,
                       experiment_id: str | None = None, actor: Actor | None = None,
                       source: str = "cli") -> ExperimentRequested:
    """The ExperimentRequested for a campaign; raises TargetError for a target that does not
    parse (the campaign processor judges the rest: dyes, budget, batch)."""
    lab = [float(v) for v in parse_target(target)]
    xid = experiment_id or f"exp-{uuid.uuid4().hex[:12]}"
    return ExperimentRequested.create(
        source=source, subject=xid, sequence=1, experiment_id=xid, actor=actor,
        target_hex=target if target.strip().startswith("#") else None, target_lab=lab,
        dyes=list(dyes), budget_wells=budget, batch_size=batch, tolerance_de=tolerance,
        requested_by=requested_by)
