"""`labbus experiment start|watch`: publish an ExperimentRequested, follow a campaign's events."""

from __future__ import annotations

import getpass
from collections.abc import Callable

from labbus.events import kafka
from labbus.events.colour_target import request_experiment
from labbus.events.config import Config
from labbus.events.model import (
    Event,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    RecipesProposed,
    WellScored,
)
from labbus.events.topics import EXPERIMENTS, topic_name

FINAL = (ExperimentCompleted, ExperimentFailed, ExperimentRejected)


def request(target: str, budget: int, batch: int, dyes: list[str], tolerance: float = 2.0,
            experiment_id: str | None = None, requested_by: str | None = None
            ) -> ExperimentRequested:
    """Straight to Kafka (an operator holding broker credentials): requested by the login name.
    Raises TargetError for a target that does not parse."""
    try:
        who = requested_by or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        who = "unknown"
    return request_experiment(target, budget, batch, dyes, who, tolerance, experiment_id)


async def publish(cfg: Config, *events: Event) -> None:
    await kafka.publish(cfg, *events)


async def watch(cfg: Config, experiment_id: str, on_event: Callable[[Event], None],
                timeout_s: float = 0) -> Event | None:
    """Feed each event of one experiment to `on_event` until its verdict (returned) or timeout
    (0: none). Reads the experiment's events on lab.experiments from the beginning."""
    def step(event: Event) -> bool:
        on_event(event)
        return isinstance(event, FINAL)

    return await kafka.follow_key(cfg, topic_name(cfg, EXPERIMENTS), experiment_id, step,
                                  timeout_s or None)


def describe(event: Event) -> str | None:
    if isinstance(event, RecipesProposed):
        pred = "" if event.predicted_de is None else f", predicted ΔE00 {event.predicted_de:.2f}"
        return f"batch {event.iteration}: {len(event.recipes)} wells{pred} ({event.note})"
    if isinstance(event, ExperimentCompleted):
        return (f"completed: {event.best_volumes} (well {event.best_well}) ΔE00 "
                f"{event.best_de:.2f} using {event.wells_used} wells; {event.reason}")
    if isinstance(event, ExperimentFailed):
        return f"failed after {event.wells_used} wells: {event.reason}"
    if isinstance(event, ExperimentRejected):
        return f"rejected: {event.reason}"
    if isinstance(event, WellScored):
        return None
    return None
