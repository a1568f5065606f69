"""Physics-shaped optimiser for closed-loop colour mixing.

Beer-Lambert says that, per wavelength, optical density adds up linearly over dyes.
A channel that integrates over many wavelengths with a non-negative sensitivity
keeps that shape locally:

    -log10(channel) ≈ baseline + Σ_i c_i · k_i,   k_i ≥ 0,

with c_i the fraction of stock i in the well. The channels are CIE X, Y, Z (see
MixingModel for why not the camera's R, G, B); readings are compared in 8-bit sRGB,
through the camera's published sRGB encoding. The model is refitted at every call,
weighted towards observations near the best recipe measured so far, where the
approximation has to hold. The state is nothing but the observations, so a
restarted process proposes exactly what the crashed one would have.

A success is declared only on a confirmed reading: the mean of several replicate
wells of one recipe must be within tolerance, with a margin for camera noise,
because a single low noisy reading is a false stop.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from labbus.processors.colour.recipes import DEFAULT_LIMITS, Limits, feasible_grid, feasible_mask
from labbus.processors.colour.scoring import delta_e2000, lab_to_srgb, srgb_to_lab

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import colour

RGB8 = tuple[int, int, int]


@dataclass(frozen=True)
class Observation:
    recipe: Mapping[str, float]  # dye → µL; water makes up the rest
    rgb8: RGB8


@dataclass(frozen=True)
class Proposal:
    recipes: list[dict[str, int]]
    done: bool
    best_recipe: dict[str, int] | None
    best_measured_de: float | None
    reason: str
    out_of_gamut: bool = False
    predicted_de: float | None = None  # of the recipe the model thinks is best
    best_replicates: int = 0


@dataclass(frozen=True)
class Settings:
    limits: Limits = DEFAULT_LIMITS
    confirm_replicates: int = 3
    confirm_z: float = 2.0            # margin, in standard errors of the replicate mean's ΔE
    prior_noise_lsb: float = 1.0      # camera noise assumed before replicates tell otherwise
    locality_ul: float = 40.0         # kernel width of the local refit
    locality_floor: float = 0.05      # far observations keep this much weight
    model_error: float = 0.01         # relative XYZ error the local model is allowed
    grid_step_ul: int = 5
    refine_window_ul: int = 4
    design_level_ul: int = 60         # dye volume of the opening two-level factorial


DEFAULT_SETTINGS = Settings()


# --------------------------------------------------------------------------- model

SRGB = colour.RGB_COLOURSPACES["sRGB"]


@dataclass(frozen=True)
class MixingModel:
    """Per tristimulus channel, optical density = baseline + fractions @ absorptivity.

    The channels are CIE X, Y and Z rather than the camera's R, G and B: X, Y and Z
    weigh the spectrum with non-negative functions, so adding dye can only lower
    them (k ≥ 0 holds). The sRGB primaries are mixtures of XYZ with negative lobes,
    and an sRGB channel can *rise* with dye (red dye raises R by removing green).
    The camera's sRGB encoding is public; only the dyes are unknown.
    """
    baseline: np.ndarray      # (3,)
    absorptivity: np.ndarray  # (3, dyes), non-negative

    def xyz(self, fractions: np.ndarray) -> np.ndarray:
        return 10.0 ** -(self.baseline + np.asarray(fractions) @ self.absorptivity.T)

    def srgb(self, fractions: np.ndarray) -> np.ndarray:
        """What the camera would report, clipped to 0..1 like the camera."""
        return np.clip(colour.XYZ_to_sRGB(self.xyz(fractions)), 0.0, 1.0)

    def lab(self, fractions: np.ndarray) -> np.ndarray:
        return srgb_to_lab(self.srgb(fractions))


def _unclipped_rgb8(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit sRGB before clipping, and its derivative with respect to linear sRGB."""
    # XYZ here is already relative to the sRGB white point, so no chromatic adaptation.
    linear = colour.XYZ_to_RGB(xyz, SRGB, chromatic_adaptation_transform=None,
                               apply_cctf_encoding=False)
    h = 1e-6
    encoded = colour.cctf_encoding(linear, function="sRGB")
    slope = (colour.cctf_encoding(linear + h, function="sRGB") - encoded) / h
    return 255.0 * encoded, 255.0 * slope


def fit_model(fractions: np.ndarray, rgb8: np.ndarray, weights: np.ndarray, noise_lsb: float = 1.0,
              start: MixingModel | None = None, model_error: float = 0.0) -> MixingModel:
    """Weighted, censored, non-negative least squares on the 8-bit readings themselves.

    Residuals are in reading counts, where camera noise is even. A channel read as
    0 or 255 only says the truth is beyond the rail, so it is penalised only when
    the prediction lands on the wrong side. With `model_error` (relative error of
    the tristimulus values, judged at `start`) a reading also tolerates the model's
    own inexactness; this matters for dark channels, where sRGB is a near-cancelling
    difference of X, Y and Z and the gamma curve is steep, so a 1 % error in XYZ
    becomes tens of counts but hardly any ΔE.
    """
    n, dyes = fractions.shape
    low_rail, high_rail = rgb8 <= 0, rgb8 >= 255
    to_rgb = SRGB.matrix_XYZ_to_RGB  # (3, 3), for the chain rule only
    sigma = np.full((n, 3), float(noise_lsb))
    if start is not None and model_error > 0:
        reference = start.xyz(fractions)
        _, slope = _unclipped_rgb8(reference)
        sigma = np.hypot(sigma, model_error * slope * (reference @ np.abs(to_rgb).T))
    scale = np.sqrt(weights)[:, None] / sigma

    def unpack(theta):
        return theta[:3], theta[3:].reshape(3, dyes)

    def evaluate(theta):
        baseline, absorptivity = unpack(theta)
        xyz = 10.0 ** -(baseline + fractions @ absorptivity.T)
        predicted, slope = _unclipped_rgb8(xyz)
        r = predicted - rgb8
        # Rails one count inside: noise may have pushed a near-rail truth onto the rail.
        r = np.where(high_rail, np.minimum(predicted - 254.0, 0.0), r)
        r = np.where(low_rail, np.maximum(predicted - 1.0, 0.0), r)
        active = ~(high_rail & (predicted >= 254.0)) & ~(low_rail & (predicted <= 1.0))
        return r, xyz, slope, active

    def residuals(theta):
        return (scale * evaluate(theta)[0]).ravel()

    def jacobian(theta):
        _, xyz, slope, active = evaluate(theta)
        # d rgb8_c / d density_j = slope_c * M[c, j] * (-ln10 * xyz_j)
        d_density = (slope[:, :, None] * to_rgb[None, :, :]
                     * (-np.log(10.0) * xyz)[:, None, :])  # (n, c, j)
        d_density *= (scale * active)[:, :, None]
        jac = np.zeros((n, 3, 3 + 3 * dyes))
        for j in range(3):
            jac[:, :, j] = d_density[:, :, j]
            jac[:, :, 3 + j * dyes: 3 + (j + 1) * dyes] = (
                d_density[:, :, j, None] * fractions[:, None, :])
        return jac.reshape(n * 3, -1)

    white = -np.log10(colour.xy_to_XYZ(SRGB.whitepoint))
    if start is None:
        theta0 = np.concatenate([white, np.full(3 * dyes, 0.5)])
    else:
        theta0 = np.concatenate([start.baseline, np.maximum(start.absorptivity.ravel(), 1e-3)])
    lower = np.concatenate([white - 1.0, np.zeros(3 * dyes)])
    upper = np.concatenate([white + 1.0, np.full(3 * dyes, 20.0)])
    theta0 = np.clip(theta0, lower + 1e-9, upper - 1e-9)
    result = least_squares(residuals, theta0, jac=jacobian, bounds=(lower, upper), method="trf")
    baseline, absorptivity = unpack(result.x)
    return MixingModel(baseline.copy(), absorptivity.copy())


# --------------------------------------------------------------------------- history

@dataclass(frozen=True)
class Measured:
    volumes: tuple[int, ...]
    mean_rgb8: np.ndarray
    replicates: int
    de: float


def _volumes(recipe: Mapping[str, float], dyes: Sequence[str]) -> tuple[int, ...]:
    unknown = set(recipe) - set(dyes) - {"water"}
    if unknown:
        raise ValueError(f"observation uses dye(s) {sorted(unknown)} "
                         f"outside this campaign's {list(dyes)}")
    return tuple(int(round(recipe.get(dye, 0))) for dye in dyes)


def summarise(history: Sequence[Observation], dyes: Sequence[str],
              target_lab: np.ndarray) -> list[Measured]:
    groups: dict[tuple[int, ...], list[RGB8]] = {}
    for observation in history:
        groups.setdefault(_volumes(observation.recipe, dyes), []).append(observation.rgb8)
    if not groups:
        return []
    means = np.array([np.mean(np.asarray(readings, dtype=float), axis=0)
                      for readings in groups.values()])
    des = np.atleast_1d(delta_e2000(srgb_to_lab(means / 255.0), target_lab))
    return [Measured(volumes, mean, len(readings), float(de))
            for (volumes, readings), mean, de in zip(groups.items(), means, des, strict=False)]


def estimate_noise_lsb(history: Sequence[Observation], dyes: Sequence[str], prior_lsb: float,
                       prior_dof: int = 4) -> float:
    """Pooled replicate standard deviation in 8-bit counts, shrunk towards the prior."""
    groups: dict[tuple[int, ...], list[RGB8]] = {}
    for observation in history:
        groups.setdefault(_volumes(observation.recipe, dyes), []).append(observation.rgb8)
    squares, dof = prior_dof * prior_lsb ** 2, prior_dof
    for readings in groups.values():
        values = np.asarray(readings, dtype=float)
        if len(values) < 2:
            continue
        for channel in values.T:
            if channel.min() > 0 and channel.max() < 255:
                squares += float(np.sum((channel - channel.mean()) ** 2))
                dof += len(channel) - 1
    return float(np.sqrt(squares / dof))


def de_standard_error(mean_rgb8: np.ndarray, replicates: int, noise_lsb: float,
                      target_lab: np.ndarray) -> float:
    """How much camera noise alone moves the ΔE of a replicate mean (first-order propagation)."""
    steps = np.eye(3) * 0.5
    base = delta_e2000(srgb_to_lab(mean_rgb8 / 255.0), target_lab)
    shifted = delta_e2000(srgb_to_lab((mean_rgb8 + steps) / 255.0), target_lab)
    gradient = (np.asarray(shifted) - base) / 0.5
    return float(np.linalg.norm(gradient) * noise_lsb / np.sqrt(replicates))


# --------------------------------------------------------------------------- search

def _predicted_de(model: MixingModel, volumes: np.ndarray, target_lab: np.ndarray,
                  total_ul: float) -> np.ndarray:
    return np.atleast_1d(delta_e2000(model.lab(volumes / total_ul), target_lab))


def best_recipe_for(model: MixingModel, target_lab: np.ndarray, n_dyes: int,
                    settings: Settings = DEFAULT_SETTINGS) -> tuple[np.ndarray, float]:
    """Lowest predicted ΔE over feasible integer recipes: a coarse grid, then a 1 µL
    neighbourhood."""
    limits = settings.limits
    grid = feasible_grid(n_dyes, settings.grid_step_ul * (1 if n_dyes <= 4 else 2),
                         limits)  # keep it fast
    de = _predicted_de(model, grid, target_lab, limits.total_ul)
    seeds = grid[np.argsort(de)[:4]]
    window = settings.refine_window_ul if n_dyes <= 4 else 2
    offsets = np.array(list(itertools.product(range(-window, window + 1), repeat=n_dyes)),
                       dtype=float)
    candidates = np.unique(np.vstack([seed + offsets for seed in seeds]), axis=0)
    candidates = candidates[feasible_mask(candidates, limits)]
    candidates = np.vstack([candidates, seeds])
    de = _predicted_de(model, candidates, target_lab, limits.total_ul)
    best = int(np.argmin(de))
    return candidates[best], float(de[best])


# --------------------------------------------------------------------------- batch design

def first_design(n_dyes: int, settings: Settings = DEFAULT_SETTINGS) -> list[tuple[int, ...]]:
    """A two-level factorial (every subset of dyes at the design level), feasible rows only."""
    rows = np.array(list(itertools.product((0, settings.design_level_ul), repeat=n_dyes)),
                    dtype=float)
    return [tuple(int(v) for v in row) for row in rows[feasible_mask(rows, settings.limits)]]


def perturbations(centre: np.ndarray, settings: Settings = DEFAULT_SETTINGS,
                  ring: int = 1) -> list[tuple[int, ...]]:
    """One step up and one down per dye, snapped across the 0 / minimum-transfer gap."""
    limits = settings.limits
    moves = []
    for dye, sign in itertools.product(range(len(centre)), (+1, -1)):
        step = ring * max(3, int(round(0.1 * centre[dye])))
        moved = centre.copy()
        moved[dye] += sign * step
        if 0 < moved[dye] < limits.min_transfer_ul:
            moved[dye] = limits.min_transfer_ul if sign > 0 else 0
        if feasible_mask(moved[None, :], limits)[0]:
            moves.append(tuple(int(v) for v in moved))
        elif sign > 0 and moved.sum() > centre.sum():
            # No room to add dye: trade it against the largest other dye instead.
            other = int(np.argmax(np.where(np.arange(len(centre)) == dye, -1, centre)))
            moved[other] -= moved.sum() - centre.sum()
            if feasible_mask(moved[None, :], limits)[0]:
                moves.append(tuple(int(v) for v in moved))
    return list(dict.fromkeys(moves))


# --------------------------------------------------------------------------- propose

def propose(history: Sequence[Observation], target_lab: Sequence[float], dyes: Sequence[str],
            batch_size: int = 8, budget: int = 96, tolerance: float = 2.0,
            warm_start: Sequence[Observation] = (),
            settings: Settings = DEFAULT_SETTINGS) -> Proposal:
    """The next batch of recipes, or a verdict. Depends only on its arguments.

    `warm_start` holds observations from earlier campaigns with the same dye stocks:
    they shape the model but never count as evidence for this target.
    """
    target = np.asarray(target_lab, dtype=float)
    dyes = list(dyes)
    limits = settings.limits
    measured = summarise(history, dyes, target)
    noise = estimate_noise_lsb(list(history) + list(warm_start), dyes, settings.prior_noise_lsb)
    best = min(measured, key=lambda m: (m.de, -m.replicates, m.volumes), default=None)
    best_recipe = dict(zip(dyes, best.volumes, strict=False)) if best else None
    best_de = best.de if best else None
    remaining = budget - len(history)

    def verdict(recipes, done, reason, out_of_gamut=False, predicted=None):
        return Proposal(recipes, done, best_recipe, best_de, reason, out_of_gamut, predicted,
                        best.replicates if best else 0)

    if best and best.replicates >= settings.confirm_replicates:
        margin = settings.confirm_z * de_standard_error(best.mean_rgb8, best.replicates, noise,
                                                        target)
        if best.de + margin < tolerance:
            return verdict([], True, f"confirmed: mean of {best.replicates} replicate wells "
                                     f"has ΔE00 {best.de:.2f} (+{margin:.2f} noise margin) "
                                     f"< {tolerance:g}")
    spent = f"budget of {budget} wells spent without a confirmed match"
    observations = list(history) + list(warm_start)
    if len(observations) < len(dyes) + 2:
        if remaining <= 0:
            return verdict([], False, spent)
        design = first_design(len(dyes), settings)
        seen = {m.volumes for m in measured}
        fresh = [v for v in design if v not in seen] or design
        return verdict([dict(zip(dyes, v, strict=False))
                        for v in fresh[:min(batch_size, remaining)]], False,
                       "exploring: too few observations to fit the mixing model")

    fractions = (np.array([_volumes(o.recipe, dyes) for o in observations], dtype=float)
                 / limits.total_ul)
    rgb8 = np.array([o.rgb8 for o in observations], dtype=float)
    model = fit_model(fractions, rgb8, np.ones(len(observations)), noise)
    model = fit_model(fractions, rgb8, np.ones(len(observations)), noise, model,
                      settings.model_error)
    centre, predicted = best_recipe_for(model, target, len(dyes), settings)
    # Refit around the best recipe measured so far: the linear-density picture is
    # only locally true, and near the answer is where it has to be right.
    anchor = np.array(best.volumes, dtype=float) if best else centre
    distance = np.linalg.norm(fractions * limits.total_ul - anchor, axis=1)
    weights = settings.locality_floor + (1 - settings.locality_floor) * np.exp(
        -0.5 * (distance / settings.locality_ul) ** 2)
    model = fit_model(fractions, rgb8, weights, noise, model, settings.model_error)
    centre, predicted = best_recipe_for(model, target, len(dyes), settings)

    out_of_gamut, gamut_reason = _gamut_check(target, predicted, tolerance,
                                              len(history) + len(warm_start))
    gamut_note = f"; {gamut_reason}" if out_of_gamut else ""
    if remaining <= 0:
        return verdict([], False, spent + gamut_note, out_of_gamut, predicted)
    # Giving up on a match is final, so it waits for half the budget (early models can be
    # wrong) and for the model to see nothing clearly better than the confirmed best.
    # It is a stop without success: done stays False.
    if (out_of_gamut and best and best.replicates >= settings.confirm_replicates
            and best.de >= tolerance
            and len(history) >= budget // 2
            and _predicted_de(model, np.array([best.volumes], float), target,
                              limits.total_ul)[0] < predicted + 0.5):
        return verdict([], False, f"stopping: closest reachable colour confirmed with "
                                  f"ΔE00 {best.de:.2f}"
                                  + gamut_note, out_of_gamut, predicted)

    centre_volumes = tuple(int(v) for v in centre)
    replicates = {m.volumes: m.replicates for m in measured}
    batch: list[tuple[int, ...]] = []
    if best and (best.de < tolerance + 1.0 or out_of_gamut):
        missing = settings.confirm_replicates - best.replicates
        # Confirmed but still inside the noise margin: more replicates tighten the mean.
        batch += [best.volumes] * (missing if missing > 0 else 2 if best.de < tolerance else 0)
    # A recipe the model believes in is planted in replicate, so a hit confirms itself.
    wanted = settings.confirm_replicates if predicted < tolerance else 1
    planted = replicates.get(centre_volumes, 0) + batch.count(centre_volumes)
    batch += [centre_volumes] * max(wanted - planted, 0 if planted else 1)
    for ring in (1, 2, 3):  # local steps teach the model its slopes; wider rings fill spare wells
        batch += [p for p in perturbations(centre, settings, ring) if p not in batch]
    batch = batch[:min(batch_size, remaining)]

    reason = (f"model's best recipe {dict(zip(dyes, centre_volumes, strict=False))} "
              f"predicts ΔE00 {predicted:.2f}" + gamut_note)
    return verdict([dict(zip(dyes, v, strict=False)) for v in batch], False, reason, out_of_gamut,
                   predicted)


def _gamut_check(target: np.ndarray, predicted_de: float, tolerance: float,
                 n_observations: int) -> tuple[bool, str]:
    srgb = lab_to_srgb(target)
    if np.any(srgb < -0.5 / 255) or np.any(srgb > 1 + 0.5 / 255):
        return True, ("target is outside the sRGB gamut the camera can report; "
                      "aiming for the closest colour")
    if predicted_de > tolerance and n_observations >= 16:
        return True, ("target looks outside the dyes' gamut: "
                      f"the closest feasible recipe is predicted at "
                      f"ΔE00 {predicted_de:.2f}; aiming for it")
    return False, ""
