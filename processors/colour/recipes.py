"""The recipe space the optimiser searches, from the labware rulebook (events/labware.py).

A recipe maps dye stock names to µL; water tops every well up to `total_ul`. The rules a recipe
must obey (pipette range, working volume, whole µL, the water top-up) and their numbers live in
the kernel's rulebook; this module re-exports them for the colour code and adds the feasible
grids the optimiser samples from. Every check returns a list of human-readable reasons; an empty
list means OK.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np

from labbus.events.labware import (
    DEFAULT_LIMITS,
    WATER,
    Limits,
    Recipe,
    plan_violations,
    recipe_violations,
    reservoir_demand,
    tips_needed,
    transfers,
    water_ul,
    well_names,
    well_violations,
)

__all__ = [
    "DEFAULT_LIMITS", "WATER", "Limits", "Recipe", "allowed_dye_volumes", "feasible_grid",
    "feasible_mask", "feasible_recipes", "plan_violations", "random_feasible_recipe",
    "recipe_violations", "reservoir_demand", "tips_needed", "transfers", "water_ul",
    "well_names", "well_violations",
]


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
