"""Simulation mode: generated protocols run on opentrons' Protocol Engine, commands streamed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from labbus.events.labware import LABWARE, Labware, Pipette, TipRack, well_names
from labbus.events.ot2_protocol import WellRecipe, generate_protocol
from labbus.producers.ot2.commands import COMMAND_KEYS
from labbus.producers.ot2.simulate import (
    RunOutcome,
    dispensed_wells,
    find_labware_id,
    liquid_sources,
    opentrons_config_dir,
    simulate_run,
    stream_simulation,
)

DYES = ["red", "yellow", "blue"]
PLATE = LABWARE.plate.load_name


def batch(n: int) -> list[WellRecipe]:
    """Deterministic varied recipes within the rulebook (some zeros, some fractional µL)."""
    out = []
    for i, well in enumerate(well_names()[:n], start=1):
        out.append(WellRecipe(well, {"red": 0.0 if i % 4 == 0 else float(20 + i * 7 % 40),
                                     "yellow": 0.0 if i % 5 == 0 else float(20 + i * 13 % 30),
                                     "blue": 0.0 if i % 3 == 0 else 20.5 + i % 30},
                              float(20 + i * 11 % 50)))
    return out


def expected(recipes: list[WellRecipe]) -> dict[str, dict[str, float]]:
    return {r.well: {s: v for s, v in {**r.dyes, "water": r.water}.items() if v > 0}
            for r in recipes}


def run(text: str, **kw) -> tuple[RunOutcome, list[dict], list[datetime]]:
    commands: list[dict] = []
    received: list[datetime] = []

    def on_command(cmd: dict) -> None:
        commands.append(cmd)
        received.append(datetime.now(UTC))

    outcome = asyncio.run(simulate_run(text, on_command, keep_engine_commands=True, **kw))
    return outcome, commands, received


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_opentrons_uses_the_project_local_config_dir() -> None:
    from opentrons.config import CONFIG

    base = opentrons_config_dir()
    assert base.is_dir() and base.is_absolute()
    assert CONFIG["robot_settings_file"].resolve().is_relative_to(base)
    assert CONFIG["labware_user_definitions_dir_v2"].resolve().is_relative_to(base)


def test_eight_well_batch_streams_every_command_in_order_and_dispenses_the_recipes() -> None:
    recipes = batch(8)
    outcome, commands, received = run(generate_protocol(recipes, DYES))

    assert outcome.status == "succeeded", outcome.errors
    assert outcome.errors == [] and outcome.error_detail is None
    assert outcome.commands == len(commands) > 50
    # same dicts, same order as the engine's own final record; plain JSON-ready data
    assert commands == outcome.engine_commands
    assert all(tuple(c) == COMMAND_KEYS for c in commands)
    assert all(c["status"] == "succeeded" and c["error"] is None for c in commands)
    assert len({c["id"] for c in commands}) == len(commands)
    completed = [ts(c["completedAt"]) for c in commands]
    assert completed == sorted(completed)
    assert all(ts(c["createdAt"]) <= ts(c["startedAt"]) <= ts(c["completedAt"]) for c in commands)
    # streamed while running: the first command arrived before the last one had completed
    assert received[0] < completed[-1]

    kinds = [c["commandType"] for c in commands]
    assert kinds[0] == "home" and kinds.count("loadLabware") == 3 and "loadPipette" in kinds
    assert kinds.count("pickUpTip") == kinds.count("dropTipInPlace") == 4  # one tip per source

    plate = find_labware_id(commands, PLATE)
    names = liquid_sources(commands, outcome.liquids)
    assert sorted(set(names.values())) == sorted([*DYES, "water"])
    assert dispensed_wells(commands, plate, names) == expected(recipes)


def test_volumes_above_tip_capacity_are_split() -> None:
    # a 200 µL well never needs more than one p300 aspiration; a p20 rulebook splits 30 µL
    p20 = Labware(pipette=Pipette("p20_single_gen2", 1.0, 20.0),
                  tiprack=TipRack("opentrons_96_tiprack_20ul", 96, 20.0))
    recipes = [WellRecipe("C3", {"red": 0.0}, 30.0)]
    outcome, commands, _ = run(generate_protocol(recipes, ["red"], labware=p20))
    assert outcome.status == "succeeded", outcome.errors
    aspirates = [c["params"]["volume"] for c in commands if c["commandType"] == "aspirate"]
    assert aspirates == [15.0, 15.0]
    plate = find_labware_id(commands, PLATE)
    assert dispensed_wells(commands, plate, liquid_sources(commands, outcome.liquids)) == {
        "C3": {"water": 30.0}}


def test_over_aspiration_fails_the_run_with_the_engine_error() -> None:
    text = generate_protocol(batch(2), DYES)
    bad = text.replace("pipette.aspirate(volume, source)", "pipette.aspirate(volume + 300, source)")
    assert bad != text
    outcome, commands, _ = run(bad)

    assert outcome.status == "failed"
    assert outcome.error_detail is not None and "Cannot aspirate" in outcome.error_detail
    assert outcome.errors[0]["errorType"] == "ExceptionInProtocolError"
    last = commands[-1]
    assert last["commandType"] == "aspirate" and last["status"] == "failed"
    assert last["error"]["errorType"] == "InvalidAspirateVolumeError"
    assert last["error"]["errorInfo"]["max_tip_volume"] == 300
    assert last["completedAt"] is not None and last["result"] is None
    assert all(c["status"] == "succeeded" for c in commands[:-1])
    # the failed command we rebuilt from FailCommandAction equals the engine's stored one
    assert commands == outcome.engine_commands
    plate = find_labware_id(commands, PLATE)
    assert dispensed_wells(commands, plate) == {}  # nothing reached the plate


def test_invalid_well_is_a_failed_run_not_an_exception() -> None:
    text = generate_protocol(batch(1), DYES)
    bad = text.replace("destination = plate[plate_well]", 'destination = plate["Z99"]')
    assert bad != text
    outcome, commands, _ = run(bad)
    assert outcome.status == "failed"
    assert outcome.error_detail == "KeyError: 'Z99'"
    assert commands and all(c["status"] == "succeeded" for c in commands)


def test_unparseable_protocol_fails_without_commands() -> None:
    outcome, commands, _ = run("requirements = {'robotType': 'OT-2', 'apiLevel': '2.28'}\n"
                               "def run(:\n")
    assert outcome.status == "failed" and commands == [] and outcome.commands == 0
    assert outcome.errors[0]["errorCode"] and outcome.error_detail


def test_async_callback_and_iterator_forms() -> None:
    text = generate_protocol(batch(2), DYES)

    async def main() -> tuple[list[dict], list]:
        seen: list[dict] = []

        async def on_command(cmd: dict) -> None:
            await asyncio.sleep(0)
            seen.append(cmd)

        await simulate_run(text, on_command)
        items = [item async for item in stream_simulation(text)]
        return seen, items

    seen, items = asyncio.run(main())
    assert isinstance(items[-1], RunOutcome) and items[-1].status == "succeeded"
    assert [c["commandType"] for c in items[:-1]] == [c["commandType"] for c in seen]
    assert items[-1].commands == len(items) - 1


def test_callback_exception_propagates() -> None:
    def boom(cmd: dict) -> None:
        raise RuntimeError("consumer broke")

    with pytest.raises(RuntimeError, match="consumer broke"):
        asyncio.run(simulate_run(generate_protocol(batch(1), DYES), boom))


def test_full_plate_batch_simulates(capsys: pytest.CaptureFixture[str]) -> None:
    recipes = batch(96)
    text = generate_protocol(recipes, DYES)
    start = time.perf_counter()
    outcome, commands, _ = run(text)
    elapsed = time.perf_counter() - start
    assert outcome.status == "succeeded"
    plate = find_labware_id(commands, PLATE)
    sources = liquid_sources(commands, outcome.liquids)
    assert dispensed_wells(commands, plate, sources) == expected(recipes)
    with capsys.disabled():
        print(f"\n[ot2] 96-well batch: {len(commands)} commands simulated in {elapsed:.2f} s")
