"""The OT-2 agent: runs each RobotRunRequested and publishes what the robot did.

For every run: RobotRunStarted, one RobotCommandExecuted per Protocol Engine command as it
completes, one WellDispensed per plate well that received liquid (from the commands themselves,
not from the plan), then RobotRunFinished or RobotRunFailed. Ids derive from the run id and the
position in the run, so a run redone after a crash re-derives the same ids; the agent reads the log
on start and sends only events whose id is not there yet, and skips runs whose outcome is there.
Offsets are committed only after a run's outputs are on the broker.

Two modes: simulation (opentrons' Protocol Engine, in-process) and robot (a real OT-2 through its
HTTP API, producers/ot2/robot_http.py). A simulated run interrupted by a crash is simply run again;
a real one is not, because liquid already went into the plate: it is reported as RobotRunFailed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from labbus.events import kafka, metrics
from labbus.events.codec import DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.model import (
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    WellDispensed,
    derived_id,
)
from labbus.events.topics import ROBOT_RUNS, group_id, topic_name

PROCESS = "agent-ot2"
OUTCOMES = {RobotRunFinished.TYPE, RobotRunFailed.TYPE}
INTERRUPTED = ("the OT-2 agent restarted during this run, so the plate's state is unknown; "
               "a robot run is never repeated")
log = logging.getLogger(__name__)

# (protocol text, on_command) -> producers.ot2.commands.RunOutcome
Runner = Callable[[str, Callable[[dict], Awaitable[None]]], Awaitable[Any]]


async def simulate(protocol_text: str, on_command) -> Any:
    from labbus.producers.ot2.simulate import simulate_run  # imports opentrons: slow, so only here

    return await simulate_run(protocol_text, on_command)


def on_robot(client) -> Runner:
    """A runner for a real OT-2 behind an OT2Client."""

    async def go(protocol_text: str, on_command) -> Any:
        return (await client.run_protocol(protocol_text, on_command)).outcome
    return go


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _sender(cfg: Config, producer, req: RobotRunRequested, mode: str, futures: list,
            present: set[str] | None = None):
    codec = default_codec()
    topic = topic_name(cfg, ROBOT_RUNS)
    seq = 0
    ids = dict(run_id=req.run_id, experiment_id=req.experiment_id, iteration=req.iteration)

    async def send(cls, purpose: str, **payload) -> None:
        nonlocal seq
        seq += 1
        event = cls.create(source=f"ot2-{mode}", subject=req.experiment_id, sequence=seq,
                           event_id=uuid.UUID(derived_id(req.run_id, purpose)),
                           correlation_id=req.envelope.correlation_id, causation_id=req.event_id,
                           **ids, **payload)
        if present is not None:
            if str(event.event_id) in present:
                return  # sent before a crash
            present.add(str(event.event_id))
        futures.append(await producer.send(topic, codec.encode(event), key=event.key))
        metrics.EVENTS_OUT.labels(PROCESS, topic).inc()
    return send


async def fail(cfg: Config, producer, req: RobotRunRequested, error: str,
               mode: str = "robot") -> None:
    futures: list = []
    await _sender(cfg, producer, req, mode, futures)(RobotRunFailed, "failed", error=error)
    await asyncio.gather(*futures)


async def execute(cfg: Config, producer, req: RobotRunRequested, runner: Runner = simulate,
                  mode: str = "simulate", present: set[str] | None = None) -> str:
    """Run one protocol, publishing as it goes; returns the run status once all is delivered."""
    from labbus.events.labware import PLATE
    from labbus.producers.ot2.commands import dispensed_wells, find_labware_id, liquid_sources

    futures: list = []
    send = _sender(cfg, producer, req, mode, futures, present)
    await send(RobotRunStarted, "started", mode=mode)
    commands: list[dict] = []

    async def on_command(cmd: dict) -> None:
        index = len(commands)
        commands.append(cmd)
        await send(RobotCommandExecuted, f"command/{index}", command_id=cmd["id"],
                   command_key=cmd.get("key"), command_type=cmd["commandType"],
                   params_json=_json(cmd.get("params") or {}), result_json=_json(cmd.get("result")),
                   status=cmd["status"], created_at=cmd.get("createdAt"),
                   started_at=cmd.get("startedAt"), completed_at=cmd.get("completedAt"),
                   error_json=_json(cmd.get("error")), index=index)

    try:
        outcome = await runner(req.protocol_text, on_command)
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
        await send(WellDispensed, f"well/{well}", well=well, volumes=wells[well])
    if status == "succeeded":
        await send(RobotRunFinished, "finished", commands=len(commands), wells=len(wells))
    else:
        await send(RobotRunFailed, "failed", error=error or f"run ended with status {status}")
    await asyncio.gather(*futures)
    return status


async def run(cfg: Config, stop: asyncio.Event, robot_url: str | None = None) -> None:
    """Simulation mode, or robot mode when `robot_url` is given."""
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    topic = topic_name(cfg, ROBOT_RUNS)
    done: set[str] = set()
    started: set[str] = set()
    present: dict[str, set[str]] = {}  # run id -> ids of its events already in the log
    async for record in kafka.read_to_end(cfg, topic):
        try:
            name, plain = codec.decode_record(record.value, plain=True)
        except DecodeError:
            continue
        if name != RobotRunRequested.TYPE:
            present.setdefault(plain["run_id"], set()).add(plain["event_id"])
        if name in OUTCOMES:
            done.add(plain["run_id"])
        elif name == RobotRunStarted.TYPE:
            started.add(plain["run_id"])
    present = {run_id: ids for run_id, ids in present.items() if run_id not in done}
    client = None
    runner, mode = simulate, "simulate"
    if robot_url:
        from labbus.producers.ot2.robot_http import OT2Client

        client = OT2Client(robot_url)
        runner, mode = on_robot(client), "robot"
    consumer = kafka.consumer(cfg, topic, group=group_id(cfg, PROCESS), fetch_max_wait_ms=100)
    producer = kafka.producer(cfg)
    await producer.start()
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                metrics.EVENTS_IN.labels(PROCESS, tp.topic).inc(len(records))
                for record in records:
                    try:
                        name, plain = codec.decode_record(record.value, plain=True)
                    except DecodeError as exc:
                        log.warning("skipping undecodable record at offset %d: %s",
                                    record.offset, exc)
                        continue
                    if name in OUTCOMES:
                        done.add(plain["run_id"])
                    if name != RobotRunRequested.TYPE or plain["run_id"] in done:
                        continue
                    req = codec.decode(record.value)
                    if mode == "robot" and req.run_id in started:
                        await fail(cfg, producer, req, INTERRUPTED)
                        status = "failed (interrupted)"
                    else:
                        status = await execute(cfg, producer, req, runner, mode,
                                               present.pop(req.run_id, set()))
                    done.add(req.run_id)
                    log.info("run %s of %s: %s", req.run_id, req.experiment_id, status)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        if client is not None:
            await client.aclose()
