"""Robot mode against recorded OT-2 robot-server responses (tests/unit/fixtures/ot2/).

The robot is an external device, so it is the one thing replaced here: an
``httpx.MockTransport`` replays the recorded exchanges strictly in order and checks that
each request the client makes is the recorded one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from labbus.events.labware import PLATE
from labbus.producers.ot2.commands import (
    COMMAND_KEYS,
    dispensed_wells,
    find_labware_id,
    liquid_sources,
)
from labbus.producers.ot2.robot_http import OT2Client, RobotHTTPError, RobotRun
from tests.unit.fixtures.ot2.record_fixtures import DYES, RECIPES, protocols

FIXTURES = Path(__file__).parent / "fixtures" / "ot2"


class Replay:
    """A recorded robot: answers each request with the next recorded response."""

    def __init__(self, name: str) -> None:
        self.cassette = json.loads((FIXTURES / f"robot_run_{name}.json").read_text("utf-8"))
        self.protocol_text = (FIXTURES / self.cassette["protocol_file"]).read_text("utf-8")
        self.pending: list[dict[str, Any]] = list(self.cassette["exchanges"])
        self.served: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers.get("Opentrons-Version") == "*"
        assert self.pending, f"unexpected extra request {request.method} {request.url}"
        ex = self.pending.pop(0)
        got = (request.method, request.url.path, dict(request.url.params))
        assert got == (ex["method"], ex["path"], ex["params"]), (
            f"expected {ex['method']} {ex['path']}")
        if "upload_sha256" in ex:  # multipart upload of the protocol file
            assert b'name="files"; filename="protocol.py"' in request.content
            assert hashlib.sha256(self.protocol_text.encode()).hexdigest() == ex["upload_sha256"]
            assert self.protocol_text.encode() in request.content
        elif "json" in ex:
            assert json.loads(request.content) == ex["json"]
        self.served.append(ex)
        return httpx.Response(ex["status_code"], json=ex["response"])


async def no_sleep(_: float) -> None:
    return None


def play(robot: Replay) -> tuple[RobotRun, list[dict]]:
    commands: list[dict] = []

    async def main() -> RobotRun:
        async with OT2Client(robot.cassette["robot_url"], transport=httpx.MockTransport(robot),
                             page_length=robot.cassette["page_length"], sleep=no_sleep) as client:
            return await client.run_protocol(robot.protocol_text, commands.append)

    result = asyncio.run(main())
    assert robot.pending == [], "client stopped before the recorded conversation ended"
    return result, commands


def test_fixture_protocols_are_the_generated_ones() -> None:
    for name, text in protocols().items():
        assert (FIXTURES / f"protocol_{name}.py").read_text("utf-8") == text


def test_successful_run_streams_each_command_once_across_pages() -> None:
    robot = Replay("succeeded")
    result, commands = play(robot)

    assert result.outcome.status == "succeeded" and result.outcome.errors == []
    assert result.protocol_id and result.run_id
    pages = [ex for ex in robot.served if ex["path"].endswith("/commands")]
    totals = [ex["response"]["meta"]["totalLength"] for ex in pages]
    assert max(totals) == len(commands) == result.outcome.commands
    # the recording paginates: some single poll needed 2+ pages, and pages ended on 'running'
    assert any(a["params"]["cursor"] != b["params"]["cursor"]
               and a["response"]["meta"]["totalLength"] == b["response"]["meta"]["totalLength"]
               for a, b in zip(pages, pages[1:], strict=False))
    assert any(ex["response"]["data"] and ex["response"]["data"][-1]["status"] == "running"
               for ex in pages)

    # once each, in order, only finished, in the same full shape as simulation mode
    assert len({c["id"] for c in commands}) == len(commands)
    order = [s["id"] for ex in pages for s in ex["response"]["data"] if s["status"] == "succeeded"]
    assert [c["id"] for c in commands] == list(dict.fromkeys(order))
    assert all(tuple(c) == COMMAND_KEYS and c["status"] == "succeeded" for c in commands)
    assert all(c["result"] is not None for c in commands)  # full command, not the list summary

    plate = find_labware_id(commands, PLATE.load_name)
    names = liquid_sources(commands, result.outcome.liquids)
    assert sorted(set(names.values())) == sorted([*DYES, "water"])
    assert dispensed_wells(commands, plate, names) == {
        r.well: {s: v for s, v in {**r.dyes, "water": r.water}.items() if v > 0} for r in RECIPES}


def test_failed_run_reports_the_engine_error() -> None:
    result, commands = play(Replay("failed"))
    outcome = result.outcome
    assert outcome.status == "failed"
    assert outcome.error_detail == "Cannot aspirate 400.0 µL when only 300 is available in the tip."
    assert outcome.errors[0]["errorType"] == "ExceptionInProtocolError"
    last = commands[-1]
    assert (last["commandType"], last["status"]) == ("aspirate", "failed")
    assert last["error"]["errorType"] == "InvalidAspirateVolumeError"
    assert all(c["status"] == "succeeded" for c in commands[:-1])
    assert len({c["id"] for c in commands}) == len(commands) == outcome.commands


def test_robot_http_errors_carry_the_robot_detail() -> None:
    def robot(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"errors": [{
            "id": "RunAlreadyActive", "title": "Run Already Active",
            "detail": "Cannot create run while another run is active.", "errorCode": "4000"}]})

    async def main() -> None:
        async with OT2Client("ot2.local", transport=httpx.MockTransport(robot)) as client:
            await client.create_run("some-protocol")

    with pytest.raises(RobotHTTPError,
                       match="Cannot create run while another run is active") as info:
        asyncio.run(main())
    assert info.value.status_code == 409 and info.value.errors[0]["id"] == "RunAlreadyActive"


def test_base_url_defaults_to_robot_port() -> None:
    async def main() -> str:
        async with OT2Client("10.0.0.7") as client:
            return client.base_url

    assert asyncio.run(main()) == "http://10.0.0.7:31950"
