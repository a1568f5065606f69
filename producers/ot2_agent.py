"""The OT-2 agent: runs each RobotRunRequested and publishes what the robot did.

For every run: RobotRunStarted, one RobotCommandExecuted per Protocol Engine command as it
completes, one WellDispensed per plate well that received liquid (from the commands themselves,
not from the plan), then RobotRunFinished or RobotRunFailed. Ids derive from the run id and the
position in the run, so a run redone after a crash re-emits the same ids. Offsets are committed
only after a run's outputs are on the broker; runs whose outcome is already in the log are
skipped (the agent reads the log's outcomes on start).

Only simulation mode (opentrons Protocol Engine, in-process) is wired so far.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from events import kafka, metrics
from events.codec import DecodeError, default_codec
from events.config import Config
from events.model import (
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    WellDispensed,
    derived_id,
)
from events.topics import ROBOT_RUNS, group_id, topic_name

PROCESS = "agent-ot2"
SOURCE = "ot2-sim"
OUTCOMES = {RobotRunFinished.TYPE, RobotRunFailed.TYPE}
log = logging.getLogger(__name__)


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


async def execute(cfg: Config, producer, req: RobotRunRequested) -> str:
    """Simulate one run, publishing as it goes; returns the run status once all is delivered."""
    from producers.ot2.protocol import PLATE
    from producers.ot2.simulate import (
        dispensed_wells,
        find_labware_id,
        liquid_sources,
        simulate_run,
    )

    codec = default_codec()
    topic = topic_name(cfg, ROBOT_RUNS)
    futures = []
    seq = 0
    ids = dict(run_id=req.run_id, experiment_id=req.experiment_id, iteration=req.iteration)

    async def send(cls, purpose, **payload):
        nonlocal seq
        seq += 1
        event = cls.create(source=SOURCE, subject=req.experiment_id, sequence=seq,
                           event_id=uuid.UUID(derived_id(req.run_id, purpose)),
                           correlation_id=req.envelope.correlation_id, causation_id=req.event_id,
                           **ids, **payload)
        futures.append(await producer.send(topic, codec.encode(event), key=event.key))
        metrics.EVENTS_OUT.labels(PROCESS, topic).inc()

    await send(RobotRunStarted, "started", mode="simulate")
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
        outcome = await simulate_run(req.protocol_text, on_command)
        status, error = outcome.status, outcome.error_detail
        try:
            plate = find_labware_id(commands, PLATE)
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


async def run(cfg: Config, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    topic = topic_name(cfg, ROBOT_RUNS)
    done: set[str] = set()
    async for record in kafka.read_to_end(cfg, topic):
        try:
            name, plain = codec.decode_record(record.value, plain=True)
        except DecodeError:
            continue
        if name in OUTCOMES:
            done.add(plain["run_id"])
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
                    status = await execute(cfg, producer, req)
                    done.add(req.run_id)
                    log.info("run %s of %s: %s", req.run_id, req.experiment_id, status)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
