"""`labbus experiment start|watch`: publish an ExperimentRequested, follow a campaign's events."""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Callable

from labbus.events import kafka
from labbus.events.codec import DecodeError, default_codec
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
from labbus.processors.colour import scoring

FINAL = (ExperimentCompleted, ExperimentFailed, ExperimentRejected)


def request(target: str, budget: int, batch: int, dyes: list[str], tolerance: float = 2.0,
            experiment_id: str | None = None, requested_by: str | None = None
            ) -> ExperimentRequested:
    """Raises scoring.TargetError for a target that does not parse."""
    lab = [float(v) for v in scoring.parse_target(target)]
    xid = experiment_id or f"exp-{uuid.uuid4().hex[:12]}"
    try:
        who = requested_by or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        who = "unknown"
    return ExperimentRequested.create(
        source="cli", subject=xid, sequence=1, experiment_id=xid,
        target_hex=target if target.strip().startswith("#") else None, target_lab=lab,
        dyes=list(dyes), budget_wells=budget, batch_size=batch, tolerance_de=tolerance,
        requested_by=who)


async def publish(cfg: Config, *events: Event) -> None:
    await kafka.publish(cfg, *events)


async def watch(cfg: Config, experiment_id: str, on_event: Callable[[Event], None],
                timeout_s: float = 0) -> Event | None:
    """Feed each event of one experiment to `on_event` until its verdict (returned) or timeout."""
    codec = default_codec()
    consumer = kafka.consumer(cfg, topic_name(cfg, EXPERIMENTS), group=None, fetch_max_wait_ms=100)
    await consumer.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s if timeout_s else None
    key = experiment_id.encode()
    try:
        while deadline is None or loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    if record.key != key:
                        continue
                    try:
                        event = codec.decode(record.value)
                    except DecodeError:
                        continue
                    on_event(event)
                    if isinstance(event, FINAL):
                        return event
        return None
    finally:
        await consumer.stop()


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
