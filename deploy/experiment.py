"""`labbus experiment start|cancel|watch`: publish an ExperimentRequested or an
ExperimentCancelRequested, follow a campaign's events."""

from __future__ import annotations

import getpass
from collections.abc import Callable

from labbus.events import kafka
from labbus.events.colour_target import request_experiment
from labbus.events.config import Config
from labbus.events.model import (
    Event,
    ExperimentCancelled,
    ExperimentCancelRequested,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    QuotaRefunded,
    QuotaReserved,
    RecipesProposed,
    WellScored,
)
from labbus.events.topics import EXPERIMENTS, topic_name

FINAL = (ExperimentCompleted, ExperimentFailed, ExperimentRejected, ExperimentCancelled)


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


def request(target: str, budget: int, batch: int, dyes: list[str], tolerance: float = 2.0,
            experiment_id: str | None = None, requested_by: str | None = None
            ) -> ExperimentRequested:
    """Straight to Kafka (an operator holding broker credentials): requested by the login name.
    Raises TargetError for a target that does not parse."""
    return request_experiment(target, budget, batch, dyes, requested_by or _who(), tolerance,
                              experiment_id)


def cancel_request(experiment_id: str, reason: str, requested_by: str | None = None
                   ) -> ExperimentCancelRequested:
    return ExperimentCancelRequested.create(
        source="cli", subject=experiment_id, sequence=0, experiment_id=experiment_id,
        reason=reason, requested_by=requested_by or _who())


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
    if isinstance(event, ExperimentCancelled):
        return (f"cancelled after {event.wells_used} wells by {event.cancelled_by}: "
                f"{event.reason}")
    if isinstance(event, QuotaReserved):
        left = "" if event.remaining is None else f", {event.remaining} left"
        return f"{event.wells} wells reserved for {event.user_id}{left}"
    if isinstance(event, QuotaRefunded):
        left = "" if event.remaining is None else f", {event.remaining} left"
        return f"{event.wells} unused wells given back to {event.user_id}{left}"
    if isinstance(event, WellScored):
        return None
    return None
