"""Parameters of a measured I-V curve (Pmax, Vmp, Imp, Voc, Isc, FF): plain functions, no I/O.

The extraction is pvlib's implementation of ASTM E1036 (`pvlib.ivtools.utils.astm_e1036`),
the standard test method for the electrical performance of PV modules: Isc and Voc from
straight-line fits through the points nearest 0 V and 0 A, Pmax from a 4th-order polynomial
fitted to P(V) around the highest measured power. Nothing here fits anything by hand; this
module checks the sweep, picks the fit window and turns pvlib's failures into a ValueError
that says what is wrong with the curve.

Why these choices (figures from `tests/unit/test_iv_analysis.py` and the slice's report):

- The power fit window is Vmp and Imp within 0.85-1.10 of the highest measured point, not
  pvlib's default 0.75-1.15: on noise-free pvlib curves the default window biases Pmax by up to
  +0.25 % at low irradiance (a sharp knee, which a quartic over a wide window rounds off); the
  narrower one by <= 0.07 %. When the narrow window cannot be fitted (too few points in it, no
  maximum inside it) the default window is tried before giving up.
- The points are only sorted by voltage, not passed through `rectify_iv_curve`: that helper drops
  the points below 0 V and beyond Voc (negative current), which E1036's straight-line fits at
  Isc and Voc use to interpolate instead of extrapolating (in a trial with noise of 0.2 % of
  Voc and 0.5 % of Isc per point, the worst Voc error fell from 0.47 % to 0.22 %).
- The generator sign convention is expected: current positive between short and open circuit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from pvlib.ivtools.utils import astm_e1036

# numpy.polynomial's fits warn with their own class in numpy 1.x, numpy.exceptions' in 2.x
RANK_WARNINGS = tuple({module.RankWarning for module in (
    np.polynomial.polyutils, getattr(np, "exceptions", None), np)
    if hasattr(module, "RankWarning")})

KEYS = ("pmax_w", "vmp_v", "imp_a", "voc_v", "isc_a", "ff")
MIN_POINTS = 20
# the E1036 power fit: the window tried first, then pvlib's default
WINDOWS = ((0.85, 1.10), (0.75, 1.15))
# a sweep must start near short circuit and end at (or beyond) open circuit
SHORT_CIRCUIT_V_FRACTION = 0.05  # a point within 5 % of the highest voltage from 0 V
OPEN_CIRCUIT_I_FRACTION = 0.02  # the current crosses zero or falls to 2 % of Isc
# points the quartic needs in its window (5 coefficients, 3 degrees of freedom left): with
# fewer it interpolates the noise (a 22-point noise-free sweep was 0.8 % off)
MIN_WINDOW_POINTS = 8
# the fitted maximum cannot lie further than this from the highest measured power
MAX_FIT_DEVIATION = 0.02


def iv_parameters(voltage_v: Sequence[float], current_a: Sequence[float]) -> dict[str, float]:
    """{"pmax_w", "vmp_v", "imp_a", "voc_v", "isc_a", "ff"} of one measured sweep (points in
    any order). ValueError with the reason when the sweep cannot give them: too few points,
    NaN or infinite values, no power produced, a sweep that does not reach short or open
    circuit, no maximum power point that a fit can place."""
    v, i = _checked(voltage_v, current_a)
    order = np.argsort(v, kind="stable")
    v, i = v[order], i[order]
    power = v * i
    measured_pmax = float(power.max())
    reasons = []
    best = int(np.argmax(power))
    for window in WINDOWS:
        in_window = _window_points(v, i, best, window)
        if in_window < MIN_WINDOW_POINTS:
            reasons.append(f"window {window}: too few points near the maximum power point "
                           f"({in_window}, the fit needs {MIN_WINDOW_POINTS}; sweep more points)")
            continue
        try:
            with warnings.catch_warnings():
                # a degenerate polynomial fit (points that do not spread over the window) is
                # an error here, not a warning and a wild result
                for category in RANK_WARNINGS:
                    warnings.simplefilter("error", category)
                fit = astm_e1036(v, i, imax_limits=window, vmax_limits=window)
        except (ValueError, np.linalg.LinAlgError, *RANK_WARNINGS) as exc:
            reasons.append(f"window {window}: {exc or type(exc).__name__}")
            continue
        result = {"pmax_w": fit["pmp"], "vmp_v": fit["vmp"], "imp_a": fit["imp"],
                  "voc_v": fit["voc"], "isc_a": fit["isc"], "ff": fit["ff"]}
        result = {key: float(result[key]) for key in KEYS}
        problem = _implausible(result, measured_pmax)
        if problem is None:
            return result
        reasons.append(f"window {window}: {problem}")
    raise ValueError("no maximum power point could be fitted to the curve ("
                     + "; ".join(reasons) + ")")


def _checked(voltage_v: Sequence[float], current_a: Sequence[float]):
    try:
        v = np.asarray(voltage_v, dtype=float)
        i = np.asarray(current_a, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"voltage and current must be numbers: {exc}") from None
    if v.ndim != 1 or i.ndim != 1:
        raise ValueError("voltage and current must be flat sequences")
    if v.size != i.size:
        raise ValueError(f"{v.size} voltage points but {i.size} current points")
    if v.size < MIN_POINTS:
        raise ValueError(f"too few points: {v.size} (an I-V sweep needs at least {MIN_POINTS})")
    for name, values in (("voltage", v), ("current", i)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"{name} point {bad[0]} is {values[bad[0]]} "
                             f"({bad.size} non-finite value(s) in the sweep)")
    if not (v * i > 0).any() or v.max() <= 0:
        raise ValueError("the sweep produces no power (no point with positive voltage and "
                         "current: is the current's sign convention reversed?)")
    v_span = float(v.max())
    if float(np.abs(v).min()) > SHORT_CIRCUIT_V_FRACTION * v_span:
        raise ValueError(f"the sweep does not reach short circuit: its lowest voltage "
                         f"{float(np.abs(v).min()):.4g} V is more than "
                         f"{SHORT_CIRCUIT_V_FRACTION:.0%} of its highest {v_span:.4g} V")
    isc_estimate = float(i[np.argmin(np.abs(v))])
    if isc_estimate <= 0:
        raise ValueError(f"the current near 0 V is {isc_estimate:.4g} A: not a generator's "
                         f"curve (is the current's sign convention reversed?)")
    if float(i.min()) > OPEN_CIRCUIT_I_FRACTION * isc_estimate:
        raise ValueError(f"the sweep does not reach open circuit: no sign change of the "
                         f"current, whose lowest value {float(i.min()):.4g} A is more than "
                         f"{OPEN_CIRCUIT_I_FRACTION:.0%} of Isc ({isc_estimate:.4g} A)")
    return v, i


def _window_points(v: np.ndarray, i: np.ndarray, best: int,
                   window: tuple[float, float]) -> int:
    """How many points astm_e1036 fits P(V) to: the same mask as pvlib's, around the highest
    measured power."""
    low, high = window
    return int(np.count_nonzero((i >= low * i[best]) & (i <= high * i[best])
                                & (v >= low * v[best]) & (v <= high * v[best])))


def _implausible(result: dict[str, float], measured_pmax: float) -> str | None:
    if not all(math.isfinite(value) for value in result.values()):
        return "a non-finite parameter"
    if not 0 < result["vmp_v"] < result["voc_v"] or not 0 < result["imp_a"] < result["isc_a"]:
        return (f"the maximum power point ({result['vmp_v']:.4g} V, {result['imp_a']:.4g} A) "
                f"is not between short circuit ({result['isc_a']:.4g} A) and open circuit "
                f"({result['voc_v']:.4g} V)")
    if abs(result["pmax_w"] - measured_pmax) > MAX_FIT_DEVIATION * measured_pmax:
        return (f"the fitted Pmax {result['pmax_w']:.4g} W is more than "
                f"{MAX_FIT_DEVIATION:.0%} from the highest measured power "
                f"{measured_pmax:.4g} W")
    return None
