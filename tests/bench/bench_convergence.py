"""Convergence benchmark of the colour optimiser against the simulated plate reader.

    python tests/bench/bench_convergence.py [--targets 30] [--seed 1] [--verbose]

Every target is the colour of a random feasible recipe, so it is reachable. The
simulator knows the truth, so for the recipe the loop currently picks as best we
know both its measured ΔE00 (what the loop sees) and its true ΔE00 (noise-free).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from labbus.processors.colour.optimiser import Observation, Proposal, propose  # noqa: E402
from labbus.processors.colour.recipes import DEFAULT_LIMITS, random_feasible_recipe  # noqa: E402
from labbus.processors.colour.scoring import delta_e2000, srgb8_to_lab  # noqa: E402
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab  # noqa: E402

DYES = ("red", "yellow", "blue")
TOLERANCE = 2.0
Policy = Callable[[Sequence[Observation], np.ndarray, int, int], Proposal]


@dataclass
class Campaign:
    wells_to_true_2: int | None = None
    wells_to_true_1: int | None = None
    declared_done: bool = False
    wells_used: int = 0
    final_measured_de: float = float("nan")
    final_true_de: float = float("nan")
    history: list[Observation] | None = None
    proposal_seconds: float = 0.0
    slowest_proposal: float = 0.0
    proposals: int = 0

    @property
    def false_stop(self) -> bool:
        return self.declared_done and not self.final_true_de < TOLERANCE


def true_de(reader: PlateReaderModel, recipe: dict[str, int], target_lab: np.ndarray) -> float:
    return float(delta_e2000(rgb_to_lab(np.asarray(reader.true_rgb(recipe)) * 255.0), target_lab))


def run_campaign(policy: Policy, reader: PlateReaderModel, target_lab: np.ndarray,
                 batch_size: int, budget: int) -> Campaign:
    history: list[Observation] = []
    result = Campaign(history=history)
    while True:
        started = time.perf_counter()
        proposal = policy(history, target_lab, batch_size, budget)
        elapsed = time.perf_counter() - started
        result.proposal_seconds += elapsed
        result.slowest_proposal = max(result.slowest_proposal, elapsed)
        result.proposals += 1
        if proposal.best_recipe is not None:
            truth = true_de(reader, proposal.best_recipe, target_lab)
            if truth < 2 and result.wells_to_true_2 is None:
                result.wells_to_true_2 = len(history)
            if truth < 1 and result.wells_to_true_1 is None:
                result.wells_to_true_1 = len(history)
            result.final_true_de, result.final_measured_de = truth, proposal.best_measured_de
        if proposal.done or not proposal.recipes:
            result.declared_done = proposal.done
            break
        readings = reader.read_many(proposal.recipes)
        history.extend(Observation(recipe, rgb)
                       for recipe, rgb in zip(proposal.recipes, readings, strict=False))
    result.wells_used = len(history)
    return result


def physics_policy(warm_start: Sequence[Observation] = ()) -> Policy:
    def policy(history, target_lab, batch_size, budget):
        return propose(history, target_lab, DYES, batch_size=batch_size, budget=budget,
                       tolerance=TOLERANCE, warm_start=warm_start)
    return policy


def random_policy(seed: int) -> Policy:
    """Random feasible recipes; the pick is the best single measured reading.

    It never declares done.
    """
    rng = np.random.default_rng(seed)

    def policy(history, target_lab, batch_size, budget):
        best, best_de = None, None
        for observation in history:
            de = float(delta_e2000(srgb8_to_lab(observation.rgb8), target_lab))
            if best_de is None or de < best_de:
                best, best_de = dict(observation.recipe), de
        size = min(batch_size, budget - len(history))
        recipes = [random_feasible_recipe(DYES, rng, DEFAULT_LIMITS) for _ in range(max(size, 0))]
        return Proposal(recipes, False, best, best_de, "random search")
    return policy


def _stat(values: list[int | None], budget: int, q: float) -> str:
    filled = np.array([budget + 1 if v is None else v for v in values], dtype=float)
    value = np.percentile(filled, q, method="inverted_cdf")
    return f">{budget}" if value > budget else f"{value:.0f}"


def summarise(label: str, campaigns: list[Campaign], budget: int) -> str:
    reached = sum(c.wells_to_true_2 is not None for c in campaigns)
    false_stops = sum(c.false_stop for c in campaigns)
    declared = sum(c.declared_done for c in campaigns)
    seconds = (sum(c.proposal_seconds for c in campaigns)
               / max(1, sum(c.proposals for c in campaigns)))
    slowest = max(c.slowest_proposal for c in campaigns)
    return (f"{label:<26}"
            f"{_stat([c.wells_to_true_2 for c in campaigns], budget, 50):>8}"
            f"{_stat([c.wells_to_true_2 for c in campaigns], budget, 90):>6}"
            f"{_stat([c.wells_to_true_1 for c in campaigns], budget, 50):>10}"
            f"{_stat([c.wells_to_true_1 for c in campaigns], budget, 90):>6}"
            f"{100 * reached / len(campaigns):>8.0f}%"
            f"{declared:>6}"
            f"{100 * false_stops / len(campaigns):>7.1f}%"
            f"{np.median([c.wells_used for c in campaigns]):>7.0f}"
            f"{np.median([c.final_measured_de for c in campaigns]):>10.2f}"
            f"{np.median([c.final_true_de for c in campaigns]):>7.2f}"
            f"{1000 * seconds:>7.0f}"
            f"{1000 * slowest:>7.0f}")


HEADER = (f"{'':<26}{'wells to true<2':>14}{'wells to true<1':>16}{'reached':>9}{'done':>6}"
          f"{'false':>8}{'wells':>7}{'final pick ΔE00':>17}{'ms/call':>12}\n"
          f"{'row':<26}{'median':>8}{'p90':>6}{'median':>10}{'p90':>6}{'true<2':>9}{'':>6}"
          f"{'stops':>8}{'used':>7}{'meas':>10}{'true':>7}{'mean':>7}{'max':>7}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 3.0],
                        help="camera σ in 8-bit counts")
    parser.add_argument("--verbose", action="store_true", help="one line per target")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    truth_reader = PlateReaderModel(noise_sigma=0.0, seed=0)
    target_recipes = [random_feasible_recipe(DYES, rng) for _ in range(args.targets)]
    targets = [rgb_to_lab(np.asarray(truth_reader.true_rgb(r)) * 255.0) for r in target_recipes]

    print(f"{args.targets} targets (colours of random feasible recipes), seed {args.seed}, "
          f"batch {args.batch}, budget {args.budget} wells, tolerance ΔE00 < {TOLERANCE:g}")
    print(HEADER)
    for sigma in args.noise:
        def reader(index: int, stream: int, sigma: float = sigma) -> PlateReaderModel:
            return PlateReaderModel(noise_sigma=sigma / 255.0,
                                    seed=args.seed * 1_000_003 + stream * 10_007 + index)

        cold = [run_campaign(physics_policy(), reader(i, 1), t, args.batch, args.budget)
                for i, t in enumerate(targets)]
        # Warm start: the previous target's whole cold campaign (same dyes, different colour).
        warm = [run_campaign(physics_policy(cold[i - 1].history), reader(i, 2), t,
                             args.batch, args.budget)
                for i, t in enumerate(targets)]
        baseline = [run_campaign(random_policy(args.seed * 7919 + i), reader(i, 3), t,
                                 args.batch, args.budget)
                    for i, t in enumerate(targets)]
        print(summarise(f"physics cold   σ={sigma:g}/255", cold, args.budget))
        print(summarise(f"physics warm   σ={sigma:g}/255", warm, args.budget))
        print(summarise(f"random search  σ={sigma:g}/255", baseline, args.budget))
        cold_median = np.median([c.wells_to_true_2 or args.budget + 1 for c in cold])
        random_median = np.median([c.wells_to_true_2 or args.budget + 1 for c in baseline])
        print(f"{'':<26}random/physics median wells ratio ≥ {random_median / cold_median:.1f} "
              f"(unreached counted as {args.budget + 1})")
        if args.verbose:
            for i, (recipe, c, w) in enumerate(zip(target_recipes, cold, warm, strict=False)):
                print(f"  {i:>2} {recipe}  cold: to<2 {c.wells_to_true_2}, used {c.wells_used}, "
                      f"done {c.declared_done}, "
                      f"meas {c.final_measured_de:.2f} true {c.final_true_de:.2f} | "
                      f"warm: to<2 {w.wells_to_true_2}, "
                      f"used {w.wells_used}, meas {w.final_measured_de:.2f} "
                      f"true {w.final_true_de:.2f}")
    print(f"wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
