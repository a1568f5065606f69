"""The runtime's Step and the agents' handlers, without Kafka: plain calls."""

from __future__ import annotations

import asyncio
import uuid

from labbus.events import config
from labbus.events.codec import default_codec
from labbus.events.model import (
    DeadLetter,
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunRequested,
    RobotRunStarted,
    WellColourMeasured,
    WellDispensed,
    derived_id,
)
from labbus.events.runtime import Record, Step
from labbus.producers.colour_reader import PlateReader
from labbus.producers.ot2.commands import RunOutcome
from labbus.producers.ot2_agent import Ot2Agent

CFG = config.load({"LABBUS_NAMESPACE": "t"})


def collect(step: Step, handler, rec: Record) -> list:
    async def go():
        return [out async for out in step.outputs(handler, rec)]
    return asyncio.run(go())


def record(value: bytes, offset: int = 7) -> Record:
    return Record("t.lab.robot.runs", 1, offset, b"k", value, 0)


def dispensed() -> WellDispensed:
    return WellDispensed.create(source="t", subject="x", sequence=1, run_id="r", experiment_id="x",
                                iteration=0, well="A1", volumes={"red": 50.0, "water": 150.0})


def test_undecodable_input_becomes_one_dead_letter_whose_id_is_its_position():
    step = Step(CFG, "agent-reader", PlateReader.accepts)
    first = collect(step, PlateReader(), record(b"junk"))
    again = collect(step, PlateReader(), record(b"junk"))
    assert [o.topic for o in first] == ["t.lab.deadletter"]
    letter = default_codec().decode(first[0].value)
    assert isinstance(letter, DeadLetter) and letter.original_value == b"junk"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "t.lab.robot.runs", 1, 7)
    assert default_codec().decode(again[0].value).event_id == letter.event_id  # sent once


def test_a_handler_that_raises_dead_letters_its_input_and_types_it_does_not_take_are_skipped():
    step = Step(CFG, "p", {WellDispensed.TYPE})

    def broken(event, _record):
        raise KeyError("no such dye")

    codec = default_codec()
    out = collect(step, broken, record(codec.encode(dispensed())))
    assert out[0].reason == "processing_error"
    other = RobotRunStarted.create(source="t", subject="x", sequence=1, run_id="r",
                                   experiment_id="x", iteration=0, mode="simulate")
    assert collect(step, broken, record(codec.encode(other))) == []


def test_the_plate_reader_reads_a_well_once_under_a_derived_id():
    step = Step(CFG, "agent-reader", PlateReader.accepts)
    event = dispensed()
    out = collect(step, PlateReader(seed=3), record(default_codec().encode(event)))
    assert [o.topic for o in out] == ["t.lab.colour.readings"]
    reading = default_codec().decode(out[0].value)
    assert isinstance(reading, WellColourMeasured)
    assert str(reading.event_id) == derived_id(event.event_id, "measured")
    assert out[0].key == b"x"


def request() -> RobotRunRequested:
    return RobotRunRequested.create(source="t", subject="x", sequence=1, run_id="run-9",
                                    experiment_id="x", iteration=0, protocol_hash="h",
                                    protocol_text="", recipes=[])


async def three_commands(_text, on_command):
    for i in range(3):
        await on_command({"id": f"c{i}", "commandType": "comment", "status": "succeeded"})
    return RunOutcome(status="failed", commands=3)


def run_agent(agent: Ot2Agent) -> list:
    async def go():
        return [e async for e in agent(request())]
    return asyncio.run(go())


def test_the_ot2_agent_yields_a_runs_events_in_order():
    events = run_agent(Ot2Agent(three_commands))
    assert isinstance(events[0], RobotRunStarted)
    assert [e.index for e in events if isinstance(e, RobotCommandExecuted)] == [0, 1, 2]
    assert isinstance(events[-1], RobotRunFailed)


def test_the_ot2_agent_does_not_resend_what_the_log_already_holds():
    agent = Ot2Agent(three_commands)
    for purpose in ("started", "command/0"):  # sent before a crash
        agent.recall(RobotCommandExecuted.TYPE, {"run_id": "run-9",
                                                 "event_id": derived_id("run-9", purpose)})
    events = run_agent(agent)
    assert [str(e.event_id) for e in events][:2] == [derived_id("run-9", "command/1"),
                                                     derived_id("run-9", "command/2")]
    assert run_agent(agent) == []  # its outcome is now known: the run is not repeated


def test_a_real_robot_run_interrupted_by_a_restart_is_reported_failed_not_repeated():
    agent = Ot2Agent(three_commands, mode="robot")
    agent.recall(RobotRunStarted.TYPE, {"run_id": "run-9",
                                        "event_id": derived_id("run-9", "started")})
    events = run_agent(agent)
    assert len(events) == 1 and isinstance(events[0], RobotRunFailed)
    assert "never repeated" in events[0].error
    assert events[0].event_id == uuid.UUID(derived_id("run-9", "failed"))
