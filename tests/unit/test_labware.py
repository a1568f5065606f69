"""The labware rulebook (events/labware.py): plate geometry and well order, volume limits, tip
policy, reservoir dead volume, the deck layout and its configuration."""

import json

import pytest

from labbus.events import labware
from labbus.events.config import SETTINGS, ConfigError, load
from labbus.events.labware import (
    DEFAULT_DECK,
    DEFAULT_LIMITS,
    LABWARE,
    DeckLayout,
    Labware,
    Limits,
    Plate,
    Stock,
    WellRecipe,
)

DYES = ["red", "yellow", "blue"]


# -- plate geometry and well order -----------------------------------------------------------------
def test_one_well_order_column_major_as_opentrons_orders_wells():
    names = labware.well_names()
    assert len(names) == 96 == LABWARE.plate.size
    assert names[:9] == ("A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1", "A2")
    assert names[-1] == "H12" and len(set(names)) == 96
    assert [labware.well_index(w) for w in ("A1", "H1", "A2", "H12")] == [0, 7, 8, 95]
    assert labware.well_position("C5") == (2, 4)
    with pytest.raises(ValueError, match="'I1' is not on a 96-well plate"):
        labware.well_index("I1")


def test_plate_rows_lay_the_wells_out_as_on_the_deck():
    rows = labware.plate_rows()
    assert len(rows) == 8 and all(len(r) == 12 for r in rows)
    assert rows[0][:3] == ("A1", "A2", "A3") and rows[-1][-1] == "H12"
    assert sorted(w for r in rows for w in r) == sorted(labware.well_names())


def test_a_smaller_plate_has_its_own_wells_and_messages():
    plate = Plate(load_name="x_24", rows="ABCD", columns=6)
    assert labware.well_names(plate)[:5] == ("A1", "B1", "C1", "D1", "A2")
    assert labware.well_violations("A7", plate) == ["well 'A7' is not on a 24-well plate (A1-D6)"]


# -- volume limits ---------------------------------------------------------------------------------
def test_the_numbers_of_the_chosen_setup():
    assert LABWARE.plate.load_name == "corning_96_wellplate_360ul_flat"
    assert (LABWARE.plate.capacity_ul, LABWARE.plate.working_volume_ul) == (360, 200)
    assert (LABWARE.pipette.load_name, LABWARE.pipette.min_ul, LABWARE.pipette.max_ul) == (
        "p300_single_gen2", 20, 300)
    assert LABWARE.tiprack.load_name == "opentrons_96_tiprack_300ul"
    assert (LABWARE.reservoir.load_name, LABWARE.reservoir.dead_volume_ul) == (
        "nest_12_reservoir_15ml", 1000)
    assert LABWARE.tip_policy == "per_source"
    # the recipe limits are the rulebook's numbers: every well filled to its working volume
    assert DEFAULT_LIMITS == Limits(200, 200, 20, 300)


def test_the_default_rulebook_is_consistent():
    assert labware.labware_violations() == []


def test_a_full_well_stays_below_the_dispense_height_so_a_shared_tip_stays_dry():
    dispense_at = LABWARE.plate.depth_mm - LABWARE.dispense_depth_mm
    assert labware.liquid_height_mm(200) == pytest.approx(6.0, abs=0.1)
    assert labware.liquid_height_mm(200) < dispense_at
    assert labware.liquid_height_mm(300) > dispense_at
    assert labware.liquid_height_mm(360) == pytest.approx(LABWARE.plate.depth_mm, abs=0.3)
    brim = Labware(plate=Plate(working_volume_ul=360))
    assert any("reaches the dispense height" in r for r in labware.labware_violations(brim))
    assert not any("dispense height" in r
                   for r in labware.labware_violations(Labware(plate=Plate(working_volume_ul=300),
                                                               tip_policy="per_transfer")))


@pytest.mark.parametrize("volume, reason", [
    (19, "x: 19 µL is below the pipette minimum 20 µL (use 0 or at least 20)"),
    (301, "x: 301 µL is above the pipette maximum 300 µL"),
    (-1, "x: -1 µL is negative"),
    (20.5, "x: 20.5 µL is not a whole number of µL"),
    (float("nan"), "x: nan µL is not a number"),
])
def test_each_transfer_rule_gives_its_reason(volume, reason):
    assert labware.transfer_violations("x", volume) == [reason]


def test_transfers_at_the_limits_and_zero_are_fine():
    for volume in (0, 20, 300):
        assert labware.transfer_violations("x", volume) == []
    assert labware.transfer_violations("x", 20.5, whole_ul=False) == []
    assert labware.transfer_violations("x", 450, split=True) == []


def test_a_transfer_above_the_pipette_maximum_is_split_into_equal_aspirations():
    assert labware.aspirations(200) == [200.0]
    assert labware.aspirations(300) == [300.0]
    assert labware.aspirations(301) == [150.5, 150.5]
    assert labware.aspirations(30, labware.Pipette("p20_single_gen2", 1, 20)) == [15.0, 15.0]


def test_a_well_above_its_working_volume_is_refused_in_a_batch():
    ok = [WellRecipe("A1", {"red": 100.0}, 100.0)]
    assert labware.batch_violations(ok, DYES, DEFAULT_DECK) == []
    over = [WellRecipe("A1", {"red": 100.0}, 101.0)]
    assert labware.batch_violations(over, DYES, DEFAULT_DECK) == [
        "well A1: 201 µL exceeds the working volume 200 µL"]
    assert labware.batch_violations([WellRecipe("A1", {"red": 10.0}, 0.0)], DYES, DEFAULT_DECK) == [
        "well A1: red: 10 µL is below the pipette minimum 20 µL (use 0 or at least 20)"]


# -- tip policy ----------------------------------------------------------------------------------
def test_one_tip_per_source_or_per_transfer():
    wells = {"A1": {"red": 40, "blue": 0, "water": 160}, "B1": {"red": 20, "blue": 30,
                                                               "water": 150}}
    assert labware.tips_for(wells) == 3  # red, blue, water
    assert labware.tips_for(wells, "per_transfer") == 5
    with pytest.raises(ValueError, match="unknown tip policy 'per_well'"):
        labware.tips_for(wells, "per_well")


def test_a_full_plate_needs_few_tips_per_source_but_more_than_a_rack_per_transfer():
    plate = [WellRecipe(w, {"red": 20.0, "yellow": 20.0, "blue": 20.0}, 140.0)
             for w in labware.well_names()]
    assert labware.batch_violations(plate, DYES, DEFAULT_DECK) == []
    assert labware.batch_violations(plate, DYES, DEFAULT_DECK, tip_policy="per_transfer") == [
        "plan needs 384 tips but only 96 are loaded"]
    four_racks = DeckLayout(tiprack_slots=(1, 4, 5, 6))
    assert labware.batch_violations(plate, DYES, four_racks, tip_policy="per_transfer") == []


# -- reservoir dead volume -------------------------------------------------------------------------
def test_a_stock_keeps_its_dead_volume():
    assert labware.stock_violations({"red": 14000}, {"red": 15000}) == []
    assert labware.stock_violations({"red": 14001}, {"red": 15000}) == [
        "red reservoir: plan needs 14001 µL but only 14000 µL is usable "
        "(15000 µL minus 1000 µL dead volume)"]
    assert labware.stock_violations({"green": 20}, {"red": 12000}) == ["no reservoir holds green"]


def test_a_batch_is_checked_against_the_deck_stocks():
    deck = DeckLayout(stocks=(Stock("red", "A1", 1200.0), Stock("water", "A2", 12000.0)))
    batch = [WellRecipe(w, {"red": 50.0}, 150.0) for w in labware.well_names()[:5]]  # 250 µL red
    assert labware.batch_violations(batch, ["red"], deck) == [
        "red reservoir: plan needs 250 µL but only 200 µL is usable "
        "(1200 µL minus 1000 µL dead volume)"]
    assert labware.batch_violations(batch[:4], ["red"], deck) == []
    assert labware.batch_violations(batch, ["yellow"], deck)[0] == (
        "dye 'yellow' is not on the deck (stocks: red, water)")


# -- the deck layout: configuration ----------------------------------------------------------------
def test_the_default_deck():
    assert DEFAULT_DECK.dyes == ("red", "yellow", "blue")
    assert DEFAULT_DECK.source_wells(["blue", "red"]) == {"blue": "A3", "red": "A1",
                                                         "water": "A4"}
    assert labware.deck_violations(DEFAULT_DECK) == []
    assert "red A1 15000 µL" in str(DEFAULT_DECK)


def test_a_deck_round_trips_through_json():
    deck = DeckLayout(stocks=(Stock("water", "A12", 15000.0), Stock("green", "A6", 5000.0,
                                                                     "#00FF00")),
                      tiprack_slots=(4, 7), reservoir_slot=5, plate_slot=6,
                      pipette_mount="left")
    assert labware.deck_from_json(json.loads(json.dumps(labware.deck_to_json(deck)))) == deck
    minimal = labware.deck_from_json({"stocks": [{"name": "water", "well": "A1",
                                                  "volume_ul": 9000}]})
    assert minimal.dyes == () and minimal.stocks[0].color == "#9E9E9E"
    assert minimal.tiprack_slots == (1,) and minimal.plate_slot == 3


@pytest.mark.parametrize("data, words", [
    ([], "a deck layout is a JSON object"),
    ({"stocks": []}, '"stocks" must be a non-empty list'),
    ({"stocks": [{"name": "red", "well": "A1", "volume_ul": 9000}]}, "no water stock"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000},
                 {"name": "red", "well": "A1", "volume_ul": 9000}]}, "reservoir wells repeat"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000},
                 {"name": "water", "well": "A2", "volume_ul": 9000}]}, "stock names repeat"),
    ({"stocks": [{"name": "water", "well": "B1", "volume_ul": 9000}]},
     "reservoir well 'B1' is not one of A1-A12"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 900}]},
     "must be above the dead volume 1000 µL and at most 15000 µL"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 16000}]}, "at most 15000 µL"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": "lots"}]}, "must be a number"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000, "color": "blue"}]},
     "is not #RRGGBB"),
    ({"stocks": [{"name": "water", "well": "A1"}]}, "expected name, well, volume_ul"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000}], "plate_slot": 2},
     "deck slots must be distinct and within 1-11: [1, 2, 2]"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000}], "plate_slot": 12},
     "within 1-11"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000}], "tiprack_slots": "1"},
     '"tiprack_slots" must be a list'),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000}],
      "pipette_mount": "middle"}, "neither 'left' nor 'right'"),
    ({"stocks": [{"name": "water", "well": "A1", "volume_ul": 9000}], "trash": 12},
     "unknown key(s) trash"),
])
def test_a_bad_deck_layout_says_what_is_wrong(data, words):
    with pytest.raises(ValueError) as info:
        labware.deck_from_json(data)
    assert words in str(info.value)


def test_the_deck_layout_is_configured_by_a_json_file(tmp_path):
    assert SETTINGS["deck_layout"].env == "LABBUS_DECK_LAYOUT"
    assert load({}).deck_layout == DEFAULT_DECK
    path = tmp_path / "deck.json"
    layout = {"stocks": [{"name": "cyan", "well": "A2", "volume_ul": 8000},
                         {"name": "water", "well": "A1", "volume_ul": 14000}], "plate_slot": 6}
    path.write_text(json.dumps(layout))
    deck = load({"LABBUS_DECK_LAYOUT": str(path)}).deck_layout
    assert deck.dyes == ("cyan",) and deck.stock("water").volume_ul == 14000
    assert deck.plate_slot == 6


@pytest.mark.parametrize("content, words", [
    (None, "cannot read it"),
    ("{not json", "it is not JSON"),
    ('{"stocks": [{"name": "red", "well": "A1", "volume_ul": 9000}]}', "no water stock"),
])
def test_a_bad_deck_layout_file_names_the_variable(tmp_path, content, words):
    path = tmp_path / "deck.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="LABBUS_DECK_LAYOUT") as info:
        load({"LABBUS_DECK_LAYOUT": str(path)})
    assert words in str(info.value)
