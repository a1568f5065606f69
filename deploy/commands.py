"""`labbus command send`: publish a CommandIssued straight to Kafka and follow it to its end.

The operator path with broker access; the gateway's SendCommand is the other path. Both derive
the command id from (device, idempotency key), so a repeated key is the same command.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from labbus.events import kafka
from labbus.events.config import Config
from labbus.events.model import (
    COMMAND_FINAL,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandIssued,
    CommandProgress,
    CommandRejected,
    CommandStarted,
    CommandTimedOut,
    Event,
    issue_command,
)
from labbus.events.runtime import Step
from labbus.events.topics import COMMANDS, topic_name

# The steps `command send --wait` shows, in order; a CommandProgress is the STARTED step's
# (how far it has come) and moves the display on to it when the CommandStarted was not seen.
STEP = {CommandIssued.TYPE: 0, CommandDispatched.TYPE: 1, CommandAccepted.TYPE: 2,
        CommandStarted.TYPE: 3, CommandProgress.TYPE: 3, **{t: 4 for t in COMMAND_FINAL}}


def issued_event(device: str, command_type: str, payload: dict, timeout_s: float,
                 idempotency_key: str | None, issued_by: str | None = None) -> CommandIssued:
    return issue_command(device, command_type, payload, timeout_s, idempotency_key,
                         issued_by or f"cli/{os.environ.get('USER', 'operator')}")


async def send(cfg: Config, device: str, command_type: str, payload: dict, timeout_s: float,
               idempotency_key: str | None = None) -> CommandIssued:
    event = issued_event(device, command_type, payload, timeout_s, idempotency_key)
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        out = Step(cfg, "cli").encode(event)
        await (await producer.send(out.topic, out.value, key=out.key))
    finally:
        await producer.stop()
    return event


def concerns(issued: CommandIssued, event: Event) -> bool:
    """An event about this request: its command, or the refusal of a reused key."""
    cid = getattr(event, "command_id", None)
    if cid == issued.command_id:
        return True
    return (isinstance(event, CommandRejected)
            and event.envelope.causation_id == issued.event_id)


async def follow(cfg: Config, issued: CommandIssued, on_event: Callable[[Event], None],
                 timeout_s: float) -> Event | None:
    """Feed each event of the command to `on_event` until a final one (returned) or timeout.
    Reads the device's events on lab.commands from just before the command was issued."""
    def step(event: Event) -> bool:
        if not concerns(issued, event):
            return False
        on_event(event)
        return event.TYPE in COMMAND_FINAL

    since = int(issued.envelope.recorded_at.timestamp() * 1000) - 5000
    return await kafka.follow_key(cfg, topic_name(cfg, COMMANDS), issued.device_id, step,
                                  timeout_s, since_ms=since, fetch_max_wait_ms=50)


def succeeded(event: Event) -> bool:
    return isinstance(event, CommandCompleted)


def describe(event: Event) -> str:
    if isinstance(event, CommandCompleted):
        return f"completed: {event.result_json}"
    if isinstance(event, CommandFailed):
        return f"failed: {event.error}"
    if isinstance(event, CommandRejected):
        return f"rejected ({event.reason_code}): {event.reason}"
    if isinstance(event, CommandTimedOut):
        return f"timed out (expired {event.expires_at.isoformat()})"
    if isinstance(event, CommandProgress):
        return "running" + _progress(event.progress, event.remaining_s, event.intermediate_json)
    if isinstance(event, CommandStarted):
        return "started" + _progress(event.progress)
    if isinstance(event, CommandAccepted):
        return "accepted"
    if isinstance(event, CommandDispatched):
        return "dispatched"
    return "issued"


def _progress(fraction: float | None, remaining_s: float | None = None,
              intermediate_json: str | None = None, width: int = 60) -> str:
    """' 40%, ~12 s left: {"T": 31.5}' with what is known; the intermediate cut to `width`."""
    parts = [f"{fraction:.0%}"] if fraction is not None else []
    if remaining_s is not None:
        parts.append(f"~{remaining_s:.0f} s left")
    text = f" {', '.join(parts)}" if parts else ""
    if intermediate_json:
        cut = intermediate_json if len(intermediate_json) <= width else \
            intermediate_json[:width - 1] + "…"
        text += f": {cut}"
    return text


class Display:
    """What `command send --wait` shows of a command's events: a line when it reaches a later
    step (never back: a late or repeated event shows nothing) and for each progress report while
    it runs. `position` is how far along the bar: the steps (100 each) and, within the STARTED
    step, the reported progress."""

    position_end = 100 * max(STEP.values())

    def __init__(self) -> None:
        self.step = 0
        self.fraction = 0.0

    @property
    def position(self) -> int:
        running = self.step == STEP[CommandStarted.TYPE]
        return 100 * self.step + (round(100 * self.fraction) if running else 0)

    def see(self, event: Event) -> str | None:
        step = STEP.get(event.TYPE)
        if step is None or step < self.step or (
                step == self.step and not isinstance(event, CommandProgress)):
            return None
        self.step = step
        progress = getattr(event, "progress", None)
        if step == STEP[CommandStarted.TYPE] and progress is not None:
            self.fraction = max(self.fraction, min(max(progress, 0.0), 1.0))
        return describe(event)
