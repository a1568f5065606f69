import numpy as np
import pytest

from labbus.processors.colour.recipes import (
    Limits,
    feasible_grid,
    feasible_mask,
    feasible_recipes,
    plan_violations,
    random_feasible_recipe,
    recipe_violations,
    reservoir_demand,
    tips_needed,
    water_ul,
    well_names,
    well_violations,
)

DYES = ("red", "yellow", "blue")


def test_a_good_recipe_has_no_violations():
    assert recipe_violations({"red": 60, "yellow": 20, "blue": 0}, dyes=DYES) == []
    assert recipe_violations({"red": 200}) == []  # no water at all is fine
    assert water_ul({"red": 60, "yellow": 20}) == 120


@pytest.mark.parametrize("well", ["A1", "H12", "D7"])
def test_wells_on_the_plate_are_accepted(well):
    assert well_violations(well) == []


@pytest.mark.parametrize("well", ["I1", "A13", "A0", "a1", "B", ""])
def test_wells_off_the_plate_are_named(well):
    assert well_violations(well) == [f"well {well!r} is not on a 96-well plate (A1-H12)"]


def test_there_are_96_wells_in_column_order():
    names = well_names()
    assert len(names) == 96 and names[0] == "A1" and names[-1] == "H12"
    assert names[:9] == ("A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1", "A2")


@pytest.mark.parametrize("recipe, reason", [
    ({"red": 10}, "red: 10 µL is below the pipette minimum 20 µL (use 0 or at least 20)"),
    ({"red": 350}, "red: 350 µL is above the pipette maximum 300 µL"),
    ({"red": 20.5}, "red: 20.5 µL is not a whole number of µL"),
    ({"red": -5}, "red: -5 µL is negative"),
    ({"red": 150, "blue": 100}, "dyes add up to 250 µL, more than the well total 200 µL"),
    ({"red": 100, "blue": 90}, "water top-up of 10 µL is below the pipette minimum 20 µL"),
    ({"green": 40}, "unknown dye(s) green; stocks are red, yellow, blue"),
])
def test_each_recipe_rule_gives_its_reason(recipe, reason):
    assert reason in recipe_violations(recipe, dyes=DYES)


def test_total_above_working_volume_is_reported():
    limits = Limits(total_ul=250, working_volume_ul=200)
    assert ("well total 250 µL exceeds the working volume 200 µL"
            in recipe_violations({"red": 50}, limits))


def test_water_rule_can_be_switched_off():
    assert recipe_violations({"red": 100, "blue": 90}, Limits(water_is_pipetted=False)) == []


def test_plan_checks_wells_reservoirs_with_dead_volume_and_tips():
    plan = {"A1": {"red": 100, "blue": 0}, "A2": {"red": 100, "blue": 20}, "Z9": {"red": 10}}
    reasons = plan_violations(plan, {"red": 250, "water": 1000}, dead_volume_ul=50,
                              tips_available=4, tip_policy="per_transfer")
    assert "well 'Z9' is not on a 96-well plate (A1-H12)" in reasons
    assert "Z9: red: 10 µL is below the pipette minimum 20 µL (use 0 or at least 20)" in reasons
    assert ("red reservoir: plan needs 210 µL but only 200 µL is usable "
            "(250 µL minus 50 µL dead volume)") in reasons
    assert "no reservoir holds blue" in reasons
    assert "plan needs 7 tips but only 4 are loaded" in reasons  # one per transfer
    assert "plan needs 3 tips but only 2 are loaded" in plan_violations(  # one per source
        plan, {"red": 250, "water": 1000}, tips_available=2)


def test_a_good_plan_passes_and_counts_liquids():
    plan = {"A1": {"red": 100, "blue": 0}, "A2": {"red": 60, "blue": 40}}
    assert reservoir_demand(plan) == {"red": 160, "water": 200, "blue": 40}
    assert tips_needed(plan) == 3  # the rulebook's policy: one tip per source
    assert tips_needed(plan, tip_policy="per_transfer") == 5
    assert plan_violations(plan, {"red": 500, "blue": 500, "water": 500}, dead_volume_ul=100,
                           tips_available=96) == []


def test_feasible_grid_agrees_with_the_rules():
    grid = feasible_grid(3, 10)
    assert len(grid) > 100
    for row in grid[:: max(1, len(grid) // 200)]:
        assert recipe_violations(dict(zip(DYES, row, strict=False))) == []
    assert all(recipe_violations(r) == [] for r in list(feasible_recipes(DYES, step=20))[:50])


def test_feasible_mask_rejects_each_rule():
    rows = np.array([[10, 0, 0], [100, 100, 10], [100, 90, 0], [20.5, 0, 0], [60, 60, 60]],
                    dtype=float)
    assert feasible_mask(rows).tolist() == [False, False, False, False, True]


def test_random_feasible_recipes_are_feasible_and_seeded():
    first = [random_feasible_recipe(DYES, np.random.default_rng(3)) for _ in range(3)]
    again = [random_feasible_recipe(DYES, np.random.default_rng(3)) for _ in range(3)]
    assert first == again
    rng = np.random.default_rng(4)
    for _ in range(200):
        assert recipe_violations(random_feasible_recipe(DYES, rng), dyes=DYES) == []
