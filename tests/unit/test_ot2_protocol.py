"""Protocol text generation for one colour-mixing batch (no opentrons needed)."""

from __future__ import annotations

import ast
import hashlib

import pytest

from labbus.events.labware import PLATE, DeckLayout, Stock, well_names
from labbus.events.ot2_protocol import (
    API_LEVEL,
    WellRecipe,
    generate_protocol,
    plan_transfers,
    protocol_hash,
)

DYES = ["red", "yellow", "blue"]
RECIPES = [
    WellRecipe("A1", {"red": 40.0, "blue": 25.0}, 100.0),
    WellRecipe("B1", {"yellow": 120.0, "blue": 0.0}, 0.0),
]


def test_protocol_is_python_with_ot2_requirements_and_labware() -> None:
    text = generate_protocol(RECIPES, DYES)
    tree = ast.parse(text)
    consts = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body if isinstance(n, ast.Assign)
        for t in n.targets if isinstance(t, ast.Name)
    }
    assert consts["requirements"] == {"robotType": "OT-2", "apiLevel": API_LEVEL} == {
        "robotType": "OT-2", "apiLevel": "2.28"}
    assert consts["metadata"]["protocolName"]
    for name in ("opentrons_96_tiprack_300ul", "nest_12_reservoir_15ml", PLATE.load_name,
                 "p300_single_gen2"):
        assert f'"{name}"' in text
    assert "define_liquid" in text and "load_liquid" in text
    # every dye and water declared, one reservoir well each, with stock volume > what is used
    liquids = {liq["name"]: liq for liq in consts["LIQUIDS"]}
    assert list(liquids) == [*DYES, "water"]
    assert [liq["well"] for liq in liquids.values()] == ["A1", "A2", "A3", "A4"]
    assert liquids["red"]["volume"] > 40 and liquids["water"]["volume"] > 100
    assert {liq["volume"] for liq in liquids.values()} == {15000.0}  # the deck layout's stocks
    assert consts["PLATE_WELLS"] == ["A1", "B1"]


def test_transfers_skip_zero_and_put_water_first() -> None:
    plan = plan_transfers(RECIPES, DYES)
    assert [(t.source, t.well, t.volume) for t in plan] == [
        ("water", "A1", 100.0), ("red", "A1", 40.0), ("yellow", "B1", 120.0), ("blue", "A1", 25.0)]


def test_hash_is_sha256_of_text_and_stable() -> None:
    a = generate_protocol(RECIPES, DYES)
    b = generate_protocol([WellRecipe(r.well, dict(r.dyes), r.water) for r in RECIPES], list(DYES))
    assert a == b
    assert protocol_hash(a) == protocol_hash(b) == hashlib.sha256(a.encode()).hexdigest()
    assert len(protocol_hash(a)) == 64
    changed = generate_protocol([RECIPES[0]._replace(water=101.0), RECIPES[1]], DYES)
    assert protocol_hash(changed) != protocol_hash(a)
    moved = generate_protocol(RECIPES, DYES, DeckLayout(plate_slot=5))
    assert protocol_hash(moved) != protocol_hash(a)


def test_layout_defaults_and_slots_in_text() -> None:
    layout = DeckLayout()
    assert (layout.tiprack_slots, layout.reservoir_slot, layout.plate_slot) == ((1,), 2, 3)
    text = generate_protocol(RECIPES, DYES, DeckLayout(tiprack_slots=(4, 7), reservoir_slot=5,
                                                       plate_slot=6, pipette_mount="left"))
    assert 'TIPRACK_SLOTS = ["4", "7"]' in text and 'RESERVOIR_SLOT = "5"' in text
    assert 'PLATE_SLOT = "6"' in text and 'PIPETTE_MOUNT = "left"' in text


@pytest.mark.parametrize("recipes, dyes, message", [
    ([WellRecipe("Z1", {"red": 20}, 0)], ["red"], "'Z1' is not on a 96-well plate"),
    ([WellRecipe("A1", {"red": 20}, 0), WellRecipe("A1", {}, 25)], ["red"], "twice"),
    ([WellRecipe("A1", {"green": 20}, 0)], ["red"], "not in"),
    ([WellRecipe("A1", {"green": 20}, 0)], ["green"], "'green' is not on the deck"),
    ([WellRecipe("A1", {"red": -1}, 0)], ["red"], "negative"),
    ([WellRecipe("A1", {"red": 10}, 0)], ["red"], "below the pipette minimum 20"),
    ([WellRecipe("A1", {"red": 150}, 61)], ["red"], "211 µL exceeds the working volume 200"),
    ([WellRecipe("A1", {"water": 20}, 0)], ["water"], "reserved"),
])
def test_invalid_batches_are_rejected(recipes, dyes, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate_protocol(recipes, dyes)


def test_tip_budget_is_checked() -> None:
    full_plate = [WellRecipe(w, {"red": 20, "blue": 20}, 20) for w in well_names()]
    text = generate_protocol(full_plate, ["red", "blue"])  # per_source: 3 tips
    plan = ast.literal_eval(text.split("PLAN = ")[1].split("\n")[0])
    assert [source for source, _ in plan] == ["A4", "A1", "A3"]  # water, red, blue: a tip each
    with pytest.raises(ValueError, match="plan needs 288 tips but only 96 are loaded"):
        generate_protocol(full_plate, ["red", "blue"], tip_policy="per_transfer")
    generate_protocol(full_plate, ["red", "blue"], DeckLayout(tiprack_slots=(1, 4, 7)),
                      tip_policy="per_transfer")


def test_sources_come_from_the_deck_layout_wells_and_volumes() -> None:
    deck = DeckLayout(stocks=(Stock("water", "A12", 9000.0),
                              Stock("blue", "A5", 3000.0, "#0000FF"), Stock("red", "A7", 2000.0)))
    text = generate_protocol(RECIPES[:1], ["red", "blue"], deck)
    liquids = ast.literal_eval(text.split("LIQUIDS = ")[1].split("\n")[0])
    assert liquids == [
        {"name": "red", "well": "A7", "volume": 2000.0, "color": "#9E9E9E"},
        {"name": "blue", "well": "A5", "volume": 3000.0, "color": "#0000FF"},
        {"name": "water", "well": "A12", "volume": 9000.0, "color": "#9E9E9E"}]


def test_a_stock_short_of_the_batch_plus_its_dead_volume_is_refused() -> None:
    deck = DeckLayout(stocks=(Stock("red", "A1", 1100.0), Stock("water", "A2", 12000.0)))
    plate = [WellRecipe(w, {"red": 20}, 180) for w in well_names()[:5]]  # 100 µL of red
    generate_protocol(plate, ["red"], deck)
    with pytest.raises(ValueError, match="red reservoir: plan needs 120 µL but only 100 µL"):
        generate_protocol([*plate, WellRecipe("F1", {"red": 20}, 180)], ["red"], deck)
