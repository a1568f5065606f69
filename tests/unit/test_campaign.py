"""Campaign logic: request validation, batches, scoring, verdicts, replay determinism."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest

from labbus.events.model import (
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    RecipesProposed,
    RobotRunRequested,
    WellColourMeasured,
    WellScored,
)
from labbus.processors import campaign
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab

DYES = ["red", "yellow", "blue"]
RECIPE = {"red": 40, "yellow": 30, "blue": 60}  # feasible, so its colour is reachable


def reachable_lab() -> list[float]:
    rgb = np.asarray(PlateReaderModel(seed=None).true_rgb(RECIPE)) * 255.0
    return [float(v) for v in rgb_to_lab(rgb)]


def request(xid="x1", **changes) -> ExperimentRequested:
    fields = dict(experiment_id=xid, target_hex=None, target_lab=reachable_lab(), dyes=DYES,
                  budget_wells=48, batch_size=8, tolerance_de=2.0, requested_by="test")
    fields.update(changes)
    return ExperimentRequested.create(source="t", subject=xid, sequence=1,
                                      event_id=uuid.UUID(int=1), **fields)


def reader(seed=3):
    model = PlateReaderModel(seed=seed)

    def read(volumes):
        rgb = model.read(volumes)
        return rgb, [float(v) for v in rgb_to_lab(rgb)]
    return read


@pytest.mark.parametrize("changes, words", [
    (dict(dyes=["red", "green"]), "unknown dye(s) green"),
    (dict(budget_wells=200), "budget of 200 wells"),
    (dict(batch_size=0), "batch size 0"),
    (dict(target_hex="#zzz"), "target '#zzz'"),
    (dict(tolerance_de=-1.0), "tolerance"),
])
def test_bad_requests_are_rejected_with_a_readable_reason(changes, words):
    out = campaign.Campaigns().handle(request(**changes))
    assert len(out) == 1 and isinstance(out[0], ExperimentRejected)
    assert words in out[0].reason


def test_a_reachable_target_completes_within_budget_without_reusing_wells():
    log = campaign.simulate(request(), reader())
    assert isinstance(log[-1], ExperimentCompleted), log[-1]
    done = log[-1]
    assert done.best_de < 2.0 and done.wells_used <= 48
    scored = [e.well for e in log if isinstance(e, WellScored)]
    assert len(scored) == len(set(scored)) == done.wells_used
    runs = [e for e in log if isinstance(e, RobotRunRequested)]
    assert [r.iteration for r in runs] == list(range(len(runs)))
    assert all("def run(" in r.protocol_text for r in runs)
    ids = [e.event_id for e in log]
    assert len(ids) == len(set(ids))


def test_replay_in_any_cross_topic_order_gives_the_same_ids():
    log = campaign.simulate(request(), reader())
    readings = []
    for run in (e for e in log if isinstance(e, RobotRunRequested)):
        readings.append(finished(run))
        read = reader(seed=hash(run.run_id) % 1000)
        for r in run.recipes:
            rgb, lab = read({**r["volumes"], "water": r["water_ul"]})
            readings.append(WellColourMeasured.create(
                source="r", subject="x1", sequence=0, experiment_id="x1", run_id=run.run_id,
                iteration=run.iteration, well=r["well"], rgb=list(rgb), lab=lab,
                instrument_id="r"))
    first = campaign.Campaigns()
    out_a = first.handle(request())
    for r in readings:
        out_a += first.handle(r)
    shuffled = readings[:]
    random.Random(5).shuffle(shuffled)
    second = campaign.Campaigns()
    out_b = []
    for r in shuffled:  # readings before their request and before their batch
        out_b += second.handle(r)
    out_b += second.handle(request())
    assert sorted(str(e.event_id) for e in out_a) == sorted(str(e.event_id) for e in out_b)


def finished(run):
    from labbus.events.model import RobotRunFinished

    return RobotRunFinished.create(source="r", subject=run.experiment_id, sequence=0,
                                   run_id=run.run_id, experiment_id=run.experiment_id,
                                   iteration=run.iteration, commands=1, wells=len(run.recipes))


def test_a_run_failing_after_every_well_was_read_fails_the_experiment_in_any_order():
    from labbus.events.model import RobotRunFailed

    for failure_first in (True, False):
        campaigns = campaign.Campaigns()
        run = next(e for e in campaigns.handle(request()) if isinstance(e, RobotRunRequested))
        read = reader()
        readings = []
        for r in run.recipes:
            rgb, lab = read({**r["volumes"], "water": r["water_ul"]})
            readings.append(WellColourMeasured.create(
                source="r", subject="x1", sequence=0, experiment_id="x1", run_id=run.run_id,
                iteration=0, well=r["well"], rgb=list(rgb), lab=lab, instrument_id="r"))
        failed = RobotRunFailed.create(source="ot2", subject="x1", sequence=1, run_id=run.run_id,
                                       experiment_id="x1", iteration=0, error="dropTip failed")
        events = [failed, *readings] if failure_first else [*readings, failed]
        out = [o for e in events for o in campaigns.handle(e)]
        assert not any(isinstance(o, RecipesProposed) for o in out)
        assert isinstance(out[-1] if not failure_first else out[0], ExperimentFailed)
        assert sum(isinstance(o, ExperimentFailed) for o in out) == 1
        assert sum(isinstance(o, WellScored) for o in out) == len(run.recipes)


def test_budget_spent_fails_the_experiment():
    log = campaign.simulate(request(budget_wells=8, target_lab=[95.0, -60.0, 90.0]), reader())
    assert isinstance(log[-1], ExperimentFailed)
    assert log[-1].wells_used == 8 and "budget" in log[-1].reason
    assert sum(isinstance(e, RecipesProposed) for e in log) == 1


def test_a_batch_breaking_the_recipe_rules_never_reaches_the_robot(monkeypatch):
    from labbus.processors.colour.optimiser import Proposal

    bad = Proposal([{"red": 5, "yellow": 0, "blue": 0}], False, None, None, "test")
    monkeypatch.setattr(campaign.optimiser, "propose", lambda *a, **k: bad)
    out = campaign.Campaigns().handle(request())
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["RecipesProposed", "RecipeRejected", "ExperimentFailed"]
    assert "below the pipette minimum" in out[1].reasons[0] and out[1].reasons[0].startswith("A1")
    assert "recipe rules" in out[2].reason


def test_a_failed_robot_run_fails_the_experiment_once():
    from labbus.events.model import RobotRunFailed

    campaigns = campaign.Campaigns()
    run = next(e for e in campaigns.handle(request()) if isinstance(e, RobotRunRequested))
    failed = RobotRunFailed.create(source="ot2", subject="x1", sequence=1, run_id=run.run_id,
                                   experiment_id="x1", iteration=0, error="tip collision")
    out = campaigns.handle(failed)
    assert len(out) == 1 and isinstance(out[0], ExperimentFailed)
    assert "tip collision" in out[0].reason and out[0].wells_used == 0
    assert campaigns.handle(failed) == []


def test_a_repeated_request_is_ignored():
    campaigns = campaign.Campaigns()
    assert campaigns.handle(request())
    assert campaigns.handle(request()) == []


def test_a_second_campaign_on_the_same_dyes_learns_from_the_first():
    shared = campaign.Campaigns()
    first = campaign.simulate(request(), reader(seed=3), campaigns=shared)
    assert isinstance(first[-1], ExperimentCompleted)
    learned = len(shared.scored)
    assert learned == first[-1].wells_used

    other = {"red": 30, "yellow": 20, "blue": 80}  # another reachable colour
    rgb = np.asarray(PlateReaderModel(seed=None).true_rgb(other)) * 255.0
    fields = dict(experiment_id="x2", target_hex=None, dyes=DYES, budget_wells=48, batch_size=8,
                  tolerance_de=2.0, requested_by="test",
                  target_lab=[float(v) for v in rgb_to_lab(rgb)])
    second = ExperimentRequested.create(source="t", subject="x2", sequence=1,
                                        event_id=uuid.UUID(int=2), **fields)
    cold = campaign.simulate(second, reader(seed=5))
    warm = campaign.simulate(second, reader(seed=5), campaigns=shared)
    assert len(shared.by_id["x2"].warm_start) == learned

    def first_batch(log):
        return next(e for e in log if isinstance(e, RecipesProposed)).recipes
    assert first_batch(warm) != first_batch(cold)
    assert isinstance(warm[-1], ExperimentCompleted), warm[-1]
    assert isinstance(cold[-1], ExperimentCompleted), cold[-1]
    assert warm[-1].best_de < 2.0
    assert warm[-1].wells_used < cold[-1].wells_used, (warm[-1].wells_used, cold[-1].wells_used)
    # the first campaign's wells never count as the second one's evidence
    assert warm[-1].wells_used == len([e for e in warm if isinstance(e, WellScored)])


def test_warm_start_is_only_other_experiments_on_the_same_dyes_read_before_the_request():
    obs = campaign.optimiser.Observation({"red": 10}, (1, 2, 3))
    scored = [campaign.Scored(100, "a", "A1", frozenset(DYES), obs),
              campaign.Scored(300, "b", "A1", frozenset(DYES), obs),      # read after the request
              campaign.Scored(50, "c", "A1", frozenset(["red", "blue"]), obs),  # other dye set
              campaign.Scored(60, "x1", "A1", frozenset(DYES), obs),      # the same experiment
              campaign.Scored(90, "d", "B1", frozenset(reversed(DYES)), obs)]
    assert campaign.warm_start_for(request(), 200, scored) == [obs, obs]
    assert campaign.warm_start_for(request(), 50, scored) == []
    no_learning = campaign.Campaigns(learn=False)
    no_learning.scored = scored
    no_learning.handle(request(), at=1000)
    assert no_learning.by_id["x1"].warm_start == []


def test_the_dyes_a_campaign_may_use_are_the_deck_layouts_stocks():
    from labbus.events.labware import DeckLayout, Stock

    deck = DeckLayout(stocks=(Stock("blue", "A6", 9000.0), Stock("red", "A5", 9000.0),
                              Stock("water", "A12", 15000.0)))
    out = campaign.Campaigns(deck=deck).handle(request())
    assert isinstance(out[0], ExperimentRejected)
    assert "unknown dye(s) yellow; the deck holds blue, red" in out[0].reason
    out = campaign.Campaigns(deck=deck).handle(request(dyes=["red", "blue"]))
    run = next(e for e in out if isinstance(e, RobotRunRequested))
    assert '"name": "red", "well": "A5", "volume": 9000.0' in run.protocol_text
    assert '"name": "water", "well": "A12"' in run.protocol_text
    wells = [r["well"] for r in run.recipes]
    assert wells == ["A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1"][:len(wells)]  # column-major


def test_a_batch_the_deck_cannot_feed_never_reaches_the_robot():
    from labbus.events.labware import DeckLayout, Stock

    deck = DeckLayout(stocks=(Stock("red", "A1", 1010.0), Stock("yellow", "A2", 1010.0),
                              Stock("blue", "A3", 1010.0), Stock("water", "A4", 15000.0)))
    out = campaign.Campaigns(deck=deck).handle(request())
    assert [type(e).__name__ for e in out] == [
        "RecipesProposed", "RecipeRejected", "ExperimentFailed"]
    assert any("reservoir: plan needs" in r and "10 µL is usable" in r for r in out[1].reasons)
