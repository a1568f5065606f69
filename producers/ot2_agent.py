"""The OT-2 agent: runs each RobotRunRequested and publishes what the robot did.

For every run: RobotRunStarted, one RobotCommandExecuted per Protocol Engine command as it
completes, one WellDispensed per plate well that received liquid (from the commands themselves,
not from the plan), then RobotRunFinished or RobotRunFailed. Ids derive from the run id and the
position in the run, so a run redone after a crash re-derives the same ids.

The agent is a handler on the runtime (labbus.events.runtime.run_consumer). Its outputs go to its
input topic under the same key, so the events of a run interrupted by a crash lie between the
group's committed offset and the log's end: the runtime shows that range to `recall` on every
assignment, and the agent then skips runs whose outcome is there and events already sent.

Two modes: simulation (opentrons' Protocol Engine, in-process) and robot (a real OT-2 through its
HTTP API, producers/ot2/robot_http.py). A simulated run interrupted by a crash is simply run again;
a real one is not, because liquid already went into the plate: it is reported as RobotRunFailed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from labbus.events.model import (
    Event,
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    WellDispensed,
    derived_id,
)

PROCESS = "agent-ot2"
OUTCOMES = {RobotRunFinished.TYPE, RobotRunFailed.TYPE}
INTERRUPTED = ("the OT-2 agent restarted during this run, so the plate's state is unknown; "
               "a robot run is never repeated")
log = logging.getLogger(__name__)

# (protocol text, on_command) -> producers.ot2.commands.RunOutcome
Runner = Callable[[str, Callable[[dict], Awaitable[None]]], Awaitable[Any]]


async def simulate(protocol_text: str, on_command) -> Any:
    from labbus.producers.ot2.simulate import simulate_run  # imports opentrons: slow, so here

    return await simulate_run(protocol_text, on_command)


def on_robot(client) -> Runner:
    """A runner for a real OT-2 behind an OT2Client."""

    async def go(protocol_text: str, on_command) -> Any:
        return (await client.run_protocol(protocol_text, on_command)).outcome
    return go


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


class _Events:
    """Makes the events of one run: ids from the run id and the event's place in the run."""

    def __init__(self, req: RobotRunRequested, mode: str) -> None:
        self.req = req
        self.mode = mode
        self.seq = 0

    def __call__(self, cls: type[Event], purpose: str, **payload) -> Event:
        self.seq += 1
        req = self.req
        return cls.create(source=f"ot2-{self.mode}", subject=req.experiment_id, sequence=self.seq,
                          event_id=uuid.UUID(derived_id(req.run_id, purpose)),
                          correlation_id=req.envelope.correlation_id, causation_id=req.event_id,
                          run_id=req.run_id, experiment_id=req.experiment_id,
                          iteration=req.iteration, **payload)


async def execute(req: RobotRunRequested, runner: Runner = simulate,
                  mode: str = "simulate") -> AsyncIterator[Event]:
    """Run one protocol, yielding each event as it happens; the last one tells the outcome."""
    from labbus.events.labware import PLATE
    from labbus.producers.ot2.commands import dispensed_wells, find_labware_id, liquid_sources

    make = _Events(req, mode)
    yield make(RobotRunStarted, "started", mode=mode)
    commands: list[dict] = []
    happened: list[Event] = []
    news = asyncio.Event()

    async def on_command(cmd: dict) -> None:
        index = len(commands)
        commands.append(cmd)
        news.set()
        happened.append(make(
            RobotCommandExecuted, f"command/{index}", command_id=cmd["id"],
            command_key=cmd.get("key"), command_type=cmd["commandType"],
            params_json=_json(cmd.get("params") or {}), result_json=_json(cmd.get("result")),
            status=cmd["status"], created_at=cmd.get("createdAt"),
            started_at=cmd.get("startedAt"), completed_at=cmd.get("completedAt"),
            error_json=_json(cmd.get("error")), index=index))

    run = asyncio.ensure_future(runner(req.protocol_text, on_command))
    try:
        while True:
            while happened:
                yield happened.pop(0)
            if run.done():
                break
            news.clear()
            waiter = asyncio.ensure_future(news.wait())
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
    finally:
        if not run.done():
            run.cancel()
    try:
        outcome = run.result()
        status, error = outcome.status, outcome.error_detail
        try:
            plate = find_labware_id(commands, PLATE.load_name)
            wells = dispensed_wells(commands, plate, liquid_sources(commands, outcome.liquids))
        except ValueError as exc:
            wells = {}
            if status == "succeeded":
                status, error = "failed", f"cannot tell what was dispensed: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported as a failed run
        log.exception("run %s crashed", req.run_id)
        status, error, wells = "failed", f"{type(exc).__name__}: {exc}", {}
    planned = [r["well"] for r in req.recipes]
    for well in sorted(wells, key=lambda w: (planned.index(w) if w in planned else 999, w)):
        yield make(WellDispensed, f"well/{well}", well=well, volumes=wells[well])
    if status == "succeeded":
        yield make(RobotRunFinished, "finished", commands=len(commands), wells=len(wells))
    else:
        yield make(RobotRunFailed, "failed", error=error or f"run ended with status {status}")


class Ot2Agent:
    """The handler: RobotRunRequested in, the run's events out."""

    accepts = {RobotRunRequested.TYPE}

    def __init__(self, runner: Runner = simulate, mode: str = "simulate") -> None:
        self.runner = runner
        self.mode = mode
        self.done: set[str] = set()  # runs whose outcome is in the log
        self.started: set[str] = set()
        self.sent: dict[str, set[str]] = {}  # run id -> ids of its events already in the log

    def recall(self, event_type: str, record: dict) -> None:
        """An event already in the log, after the last committed request."""
        if event_type == RobotRunRequested.TYPE:
            return
        self.sent.setdefault(record["run_id"], set()).add(record["event_id"])
        if event_type in OUTCOMES:
            self.done.add(record["run_id"])
        elif event_type == RobotRunStarted.TYPE:
            self.started.add(record["run_id"])

    async def __call__(self, req: RobotRunRequested, _record=None) -> AsyncIterator[Event]:
        if req.run_id in self.done:
            return
        sent = self.sent.pop(req.run_id, set())
        if self.mode == "robot" and req.run_id in self.started:
            events = _interrupted(req)
        else:
            events = execute(req, self.runner, self.mode)
        last = None
        async for event in events:
            last = event
            if str(event.event_id) not in sent:
                yield event
        self.done.add(req.run_id)
        log.info("run %s of %s: %s", req.run_id, req.experiment_id,
                 "finished" if isinstance(last, RobotRunFinished) else "failed")


async def _interrupted(req: RobotRunRequested) -> AsyncIterator[Event]:
    yield _Events(req, "robot")(RobotRunFailed, "failed", error=INTERRUPTED)
