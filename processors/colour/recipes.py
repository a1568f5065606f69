"""Recipe and plate-plan constraints of the OT-2 with a p300 pipette, as pure functions.

A recipe maps dye stock names to µL; water tops every well up to `total_ul`.
Every check returns a list of human-readable reasons; an empty list means OK.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Recipe = Mapping[str, float]
WATER = "water"
_WELL = re.compile(r"^([A-H])(1[0-2]|[1-9])$")


@dataclass(frozen=True)
class Limits:
    total_ul: int = 200               # every well is filled to this volume, water making up
                                      # the rest
    working_volume_ul: float = 200.0  # most a well may hold
    min_transfer_ul: float = 20.0     # p300 single-channel range
    max_transfer_ul: float = 300.0
    water_is_pipetted: bool = True    # the water top-up is a transfer too, so it obeys the
                                      # p300 range


DEFAULT_LIMITS = Limits()


def well_names() -> list[str]:
    return [f"{row}{column}" for row in "ABCDEFGH" for column in range(1, 13)]


def water_ul(recipe: Recipe, limits: Limits = DEFAULT_LIMITS) -> float:
    return limits.total_ul - sum(recipe.values())


def well_violations(well: str) -> list[str]:
    if _WELL.match(well):
        return []
    return [f"well {well!r} is not on a 96-well plate (A1-H12)"]


def recipe_violations(recipe: Recipe, limits: Limits = DEFAULT_LIMITS,
                      dyes: Sequence[str] | None = None) -> list[str]:
    reasons = []
    if dyes is not None:
        unknown = sorted(set(recipe) - set(dyes))
        if unknown:
            reasons.append(f"unknown dye(s) {', '.join(unknown)}; stocks are {', '.join(dyes)}")
    for dye, volume in recipe.items():
        reasons.extend(_transfer_violations(dye, volume, limits))
    if limits.total_ul > limits.working_volume_ul:
        reasons.append(f"well total {limits.total_ul:g} µL exceeds the working volume "
                       f"{limits.working_volume_ul:g} µL")
    dye_total = sum(recipe.values())
    if dye_total > limits.total_ul:
        reasons.append(f"dyes add up to {dye_total:g} µL, "
                       f"more than the well total {limits.total_ul:g} µL")
    elif limits.water_is_pipetted and 0 < limits.total_ul - dye_total < limits.min_transfer_ul:
        reasons.append(f"water top-up of {limits.total_ul - dye_total:g} µL is below the pipette "
                       f"minimum {limits.min_transfer_ul:g} µL")
    return reasons


def _transfer_violations(liquid: str, volume: float, limits: Limits) -> list[str]:
    if volume < 0:
        return [f"{liquid}: {volume:g} µL is negative"]
    reasons = []
    if volume != int(volume):
        reasons.append(f"{liquid}: {volume:g} µL is not a whole number of µL")
    if 0 < volume < limits.min_transfer_ul:
        reasons.append(f"{liquid}: {volume:g} µL is below the pipette minimum "
                       f"{limits.min_transfer_ul:g} µL "
                       f"(use 0 or at least {limits.min_transfer_ul:g})")
    if volume > limits.max_transfer_ul:
        reasons.append(f"{liquid}: {volume:g} µL is above the pipette maximum "
                       f"{limits.max_transfer_ul:g} µL")
    return reasons


def transfers(plan: Mapping[str, Recipe],
              limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, str, float]]:
    """(well, liquid, µL) for every non-zero transfer, water included."""
    moves = []
    for well, recipe in plan.items():
        for liquid, volume in {**recipe, WATER: water_ul(recipe, limits)}.items():
            if volume > 0:
                moves.append((well, liquid, volume))
    return moves


def reservoir_demand(plan: Mapping[str, Recipe],
                     limits: Limits = DEFAULT_LIMITS) -> dict[str, float]:
    demand: dict[str, float] = {}
    for _, liquid, volume in transfers(plan, limits):
        demand[liquid] = demand.get(liquid, 0.0) + volume
    return demand


def tips_needed(plan: Mapping[str, Recipe], limits: Limits = DEFAULT_LIMITS) -> int:
    """A fresh tip per transfer, so no stock is carried into another."""
    return len(transfers(plan, limits))


def plan_violations(plan: Mapping[str, Recipe], reservoirs_ul: Mapping[str, float], *,
                    dead_volume_ul: float = 0.0, tips_available: int | None = None,
                    limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Everything wrong with filling `plan` (well → recipe) from reservoirs holding `reservoirs_ul`.

    A reservoir must keep `dead_volume_ul` the pipette cannot reach.
    """
    reasons = []
    for well, recipe in plan.items():
        reasons.extend(well_violations(well))
        reasons.extend(f"{well}: {reason}" for reason in recipe_violations(recipe, limits))
    for liquid, needed in sorted(reservoir_demand(plan, limits).items()):
        if liquid not in reservoirs_ul:
            reasons.append(f"no reservoir holds {liquid}")
            continue
        available = reservoirs_ul[liquid] - dead_volume_ul
        if needed > available:
            reasons.append(f"{liquid} reservoir: plan needs {needed:g} µL "
                           f"but only {available:g} µL is "
                           f"usable ({reservoirs_ul[liquid]:g} µL minus "
                           f"{dead_volume_ul:g} µL dead volume)")
    if tips_available is not None:
        tips = tips_needed(plan, limits)
        if tips > tips_available:
            reasons.append(f"plan needs {tips} tips but only {tips_available} are loaded")
    return reasons


def allowed_dye_volumes(limits: Limits = DEFAULT_LIMITS, step: int = 1) -> list[int]:
    top = int(min(limits.max_transfer_ul, limits.total_ul))
    low = int(np.ceil(limits.min_transfer_ul))
    return [0] + list(range(low, top + 1, step)) + ([top] if (top - low) % step else [])


@functools.lru_cache(maxsize=16)
def feasible_grid(n_dyes: int, step: int = 5, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """All feasible dye-volume vectors (rows, µL) whose volumes lie on the `step` grid."""
    values = np.array(allowed_dye_volumes(limits, step), dtype=float)
    grid = np.zeros((1, 0))
    for _ in range(n_dyes):  # grow one dye at a time, pruning overfull wells early
        grid = np.hstack([np.repeat(grid, len(values), axis=0),
                          np.tile(values, len(grid))[:, None]])
        grid = grid[grid.sum(axis=1) <= limits.total_ul]
    grid = grid[feasible_mask(grid, limits)]
    grid.setflags(write=False)
    return grid


def feasible_mask(volumes: np.ndarray, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Row-wise feasibility of dye-volume vectors; the vectorised twin of recipe_violations."""
    volumes = np.asarray(volumes, dtype=float)
    per_dye = (volumes == 0) | ((volumes >= limits.min_transfer_ul)
                                & (volumes <= limits.max_transfer_ul))
    ok = np.all(per_dye & (volumes == np.round(volumes)), axis=-1)
    water = limits.total_ul - volumes.sum(axis=-1)
    ok &= water >= 0
    if limits.water_is_pipetted:
        ok &= (water == 0) | (water >= limits.min_transfer_ul)
    return ok


def feasible_recipes(dyes: Sequence[str], step: int = 5,
                     limits: Limits = DEFAULT_LIMITS) -> Iterable[dict[str, int]]:
    for row in feasible_grid(len(dyes), step, limits):
        yield dict(zip(dyes, (int(v) for v in row), strict=False))


def random_feasible_recipe(dyes: Sequence[str], rng: np.random.Generator,
                           limits: Limits = DEFAULT_LIMITS,
                           p_absent: float = 0.25) -> dict[str, int]:
    """Each dye absent with probability `p_absent`, otherwise uniform over its range;
    rejection-sampled."""
    low, high = (int(np.ceil(limits.min_transfer_ul)),
                 int(min(limits.max_transfer_ul, limits.total_ul)))
    while True:
        volumes = np.array([0 if rng.random() < p_absent else int(rng.integers(low, high + 1))
                            for _ in dyes])
        if volumes.any() and feasible_mask(volumes[None, :], limits)[0]:
            return dict(zip(dyes, (int(v) for v in volumes), strict=False))
