"""The analysis functions a protocol template names, by name.

Their signatures (which parameters take a reading series, which a number, which outputs) are
declared in the kernel (`labbus.events.protocols.ANALYSIS_FUNCTIONS`) so that a template is
checked when it is loaded; this module holds what they compute. A function raises ValueError
(or ArithmeticError) for data it cannot work on; `AnalysisUnavailable` when its implementation is
not installed. Both become a failure reason of the evaluation, never a crash.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence

Result = float | Mapping[str, float]


class AnalysisUnavailable(Exception):
    """The function's implementation cannot be imported here."""


def _series(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError("no values")
    bad = next((v for v in out if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"value {bad} is not a finite number")
    return out


def minimum(values: Sequence[float]) -> float:
    return min(_series(values))


def maximum(values: Sequence[float]) -> float:
    return max(_series(values))


def mean(values: Sequence[float]) -> float:
    series = _series(values)
    return math.fsum(series) / len(series)


def last(values: Sequence[float]) -> float:
    return _series(values)[-1]


def relative_change(new: float, reference: float) -> float:
    """(new - reference) / reference: -0.049 when Pmax fell by 4.9 %."""
    if reference == 0:
        raise ValueError("relative change against a reference of 0")
    return (new - reference) / reference


def iv_parameters(voltage_v: Sequence[float], current_a: Sequence[float]) -> Mapping[str, float]:
    """Pmax, Vmp, Imp, Voc, Isc and FF of a measured I-V curve, by
    `labbus.processors.qc.iv.iv_parameters` (pvlib's I-V tools)."""
    try:
        iv = importlib.import_module("labbus.processors.qc.iv")
    except ImportError as e:
        raise AnalysisUnavailable(f"the I-V analysis (labbus.processors.qc.iv) cannot be "
                                  f"imported: {e}") from e
    return iv.iv_parameters(voltage_v, current_a)


FUNCTIONS: dict[str, Callable[..., Result]] = {
    "min": minimum,
    "max": maximum,
    "mean": mean,
    "last": last,
    "relative_change": relative_change,
    "iv_parameters": iv_parameters,
}
