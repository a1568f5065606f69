"""The OT-2 agent's run -> events mapping, in robot mode against recorded robot responses."""

from __future__ import annotations

import asyncio

import httpx

from labbus.events import config
from labbus.events.codec import default_codec
from labbus.events.model import (
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    WellDispensed,
)
from labbus.events.runtime import Step
from labbus.producers import ot2_agent
from labbus.producers.ot2.robot_http import OT2Client
from tests.unit.fixtures.ot2.record_fixtures import RECIPES
from tests.unit.test_ot2_robot_http import Replay, no_sleep


def agent_run(name: str) -> list:
    robot = Replay(name)
    req = RobotRunRequested.create(
        source="t", subject="x1", sequence=1, run_id="run-1", experiment_id="x1", iteration=0,
        protocol_hash="h", protocol_text=robot.protocol_text,
        recipes=[{"well": r.well, "volumes": dict(r.dyes), "water_ul": r.water} for r in RECIPES])
    async def main():
        async with OT2Client(robot.cassette["robot_url"], transport=httpx.MockTransport(robot),
                             page_length=robot.cassette["page_length"], sleep=no_sleep) as client:
            return [e async for e in ot2_agent.execute(req, ot2_agent.on_robot(client), "robot")]

    events = asyncio.run(main())
    step = Step(config.load({}), "agent-ot2")
    outgoing = [step.encode(e) for e in events]
    assert all(o.key == b"x1" for o in outgoing)
    assert {o.topic for o in outgoing} == {"lab.robot.runs"}
    assert [default_codec().decode(o.value) for o in outgoing] == events
    status = "succeeded" if isinstance(events[-1], RobotRunFinished) else "failed"
    return status, events


def test_a_robot_run_becomes_started_commands_wells_finished():
    status, events = agent_run("succeeded")
    assert status == "succeeded"
    assert isinstance(events[0], RobotRunStarted) and events[0].mode == "robot"
    commands = [e for e in events if isinstance(e, RobotCommandExecuted)]
    assert [c.index for c in commands] == list(range(len(commands)))
    wells = [e for e in events if isinstance(e, WellDispensed)]
    assert [w.well for w in wells] == [r.well for r in RECIPES]
    for w, r in zip(wells, RECIPES, strict=True):
        assert w.volumes == {s: v for s, v in {**r.dyes, "water": r.water}.items() if v > 0}
    assert isinstance(events[-1], RobotRunFinished)
    assert events[-1].commands == len(commands) and events[-1].wells == len(RECIPES)
    assert len({e.event_id for e in events}) == len(events)


def test_a_failed_robot_run_reports_the_engine_error():
    status, events = agent_run("failed")
    assert status == "failed"
    assert isinstance(events[-1], RobotRunFailed) and events[-1].error
    assert any(c.status == "failed" for c in events if isinstance(c, RobotCommandExecuted))
