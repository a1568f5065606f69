"""Campaign state as JSON-able values (the experiment processor's faust Table), and the
processor's handler over a dict table: same decisions as the pure campaign functions."""

from __future__ import annotations

import dataclasses
import json
import uuid

from labbus.events.codec import default_codec
from labbus.events.faust_runtime import Shared
from labbus.events.model import (
    ExperimentCompleted,
    ExperimentRequested,
    RobotRunFinished,
    RobotRunRequested,
    WellColourMeasured,
)
from labbus.events.runtime import Record
from labbus.processors import campaign, experiment, quota
from tests.unit.test_campaign import finished, reader, request


def reserved(req: ExperimentRequested):
    """The quota processor's QuotaReserved for a request of a user without a quota."""
    _, (event,) = quota.decide(quota.new_user(req.requested_by), req)
    assert event.TYPE == "lab.quota.QuotaReserved"
    return event


def json_round_trip(value):
    return json.loads(json.dumps(value))


def content(event) -> tuple:
    """Everything but the clock times."""
    env = event.envelope
    return (env.event_id, env.event_type, env.source, env.subject, env.correlation_id,
            env.causation_id, env.sequence,
            {f.name: getattr(event, f.name) for f in dataclasses.fields(event)
             if f.name != "envelope"})


def readings_of(run, read):
    out = []
    for r in run.recipes:
        rgb, lab = read({**r["volumes"], "water": r["water_ul"]})
        out.append(WellColourMeasured.create(
            source="r", subject=run.experiment_id, sequence=0, experiment_id=run.experiment_id,
            run_id=run.run_id, iteration=run.iteration, well=r["well"], rgb=list(rgb), lab=lab,
            instrument_id="r"))
    return out


def test_state_round_trips_at_every_step_and_decides_the_same():
    read = reader(seed=7)
    c, out = campaign.start(request())
    twin = campaign.from_state(json_round_trip(campaign.to_state(c)))
    steps = 0
    while True:
        runs = [e for e in out if isinstance(e, RobotRunRequested)]
        if not runs:
            break
        run = runs[0]
        readings = readings_of(run, read)
        # the first reading of the *next* batch arrives early: parked, and must survive
        events = [readings[0], finished(run), *readings[1:]]
        out = []
        for i, e in enumerate(events):
            state = json_round_trip(campaign.to_state(c))
            twin = campaign.from_state(state)
            assert campaign.to_state(twin) == state
            if isinstance(e, RobotRunFinished):
                a, b = campaign.on_run_finished(c, e), campaign.on_run_finished(twin, e)
            else:
                a, b = campaign.on_reading(c, e, 1000 + i), campaign.on_reading(twin, e, 1000 + i)
            assert [content(x) for x in a] == [content(x) for x in b]
            out += a
        steps += 1
    assert isinstance(out[-1], ExperimentCompleted) and steps >= 2
    assert campaign.settled(c) and campaign.settled(campaign.from_state(campaign.to_state(c)))


def test_parked_readings_and_warm_start_survive_the_round_trip():
    c, out = campaign.start(request())
    run = next(e for e in out if isinstance(e, RobotRunRequested))
    early = readings_of(run, reader())[0]
    early = WellColourMeasured.create(**{**early_fields(early), "iteration": run.iteration + 1})
    assert campaign.on_reading(c, early, 5) == []
    c.warm_start = [campaign.optimiser.Observation({"red": 10, "yellow": 0, "blue": 90},
                                                   (12, 40, 200))]
    back = campaign.from_state(json_round_trip(campaign.to_state(c)))
    written = {k: e.with_envelope(schema_version=default_codec().schema(e.TYPE).version)
               for k, e in c.parked.items()}  # the version the bytes were written with
    assert back.parked == written and back.read_at == c.read_at
    assert back.warm_start == c.warm_start and back.history == c.history
    assert list(back.batch) == list(c.batch) and back.batch == c.batch


def early_fields(e: WellColourMeasured) -> dict:
    return dict(source="r", subject=e.experiment_id, sequence=0, experiment_id=e.experiment_id,
                run_id=e.run_id, iteration=e.iteration, well=e.well, rgb=list(e.rgb),
                lab=list(e.lab), instrument_id="r")


def drive(table: dict, shared: Shared, req: ExperimentRequested, read, t0: int,
          partition: int = 0) -> list:
    """The processor's handler over a dict table, with a JSON round trip at every step."""
    clock = [t0]

    def feed(event):
        clock[0] += 1
        rec = Record("t", partition, clock[0], event.key, b"", clock[0])
        key = event.key.decode()
        new, out = experiment.handle(table.get(key), event, rec, shared)
        shared.apply()
        if new is None:
            table.pop(key, None)
        else:
            table[key] = json_round_trip(new)
        return list(out)

    assert feed(req) == []  # a campaign starts once its budget is reserved
    log = feed(reserved(req))
    pending = log
    while True:
        runs = [e for e in pending if isinstance(e, RobotRunRequested)]
        if not runs:
            return log
        pending = []
        for run in runs:
            readings = readings_of(run, read)
            for e in [*readings, finished(run), readings[0]]:  # a repeated reading at the end
                pending += feed(e)
        log += pending


def test_the_handler_decides_as_the_pure_campaign_and_warm_starts_from_the_global_table():
    table, shared = {}, Shared({})
    log = drive(table, shared, request(), reader(seed=3), 1000)
    pure = campaign.simulate(request(), reader(seed=3))
    assert [e.event_id for e in log] == [e.event_id for e in pure]
    # settled: the campaign is gone; only the repeated reading fed after the verdict waits there
    assert "campaign" not in table["x1"] and len(table["x1"]["waiting"]) == 1
    ring = experiment._ring(shared, experiment.dye_set(["red", "yellow", "blue"]), 0)
    assert len(ring) == pure[-1].wells_used

    # a second campaign on the same dyes, requested later: warm-started with the first's wells
    second = ExperimentRequested.create(
        source="t", subject="x2", sequence=1, event_id=uuid.UUID(int=2),
        **{**request_fields(), "experiment_id": "x2"})
    out = drive(table, shared, second, reader(seed=5), 10_000, partition=2)
    assert isinstance(out[-1], ExperimentCompleted)
    warm = campaign.Campaigns()
    campaign.simulate(request(), reader(seed=3), campaigns=warm)
    assert out[-1].wells_used <= warm_simulated_wells(second, warm)

    # requested *before* the first campaign's readings: learns nothing
    early = experiment.warm_start(shared, second, 1000)
    assert early == []
    # a repeated request of a running campaign decides nothing
    rec = Record("t", 0, 99, b"x3", b"", 99)
    third = ExperimentRequested.create(source="t", subject="x3", sequence=1,
                                       **{**request_fields(), "experiment_id": "x3"})
    state, out = experiment.handle(None, third, rec, shared)
    assert out == [] and state is not None
    assert experiment.handle(state, third, rec, shared) == (state, [])
    state, out = experiment.handle(state, reserved(third), rec, shared)
    assert out and "campaign" in state
    assert experiment.handle(state, third, rec, shared) == (state, [])
    assert experiment.handle(state, reserved(third), rec, shared) == (state, [])


def request_fields() -> dict:
    r = request()
    return dict(experiment_id=r.experiment_id, target_hex=None, target_lab=list(r.target_lab),
                dyes=list(r.dyes), budget_wells=r.budget_wells, batch_size=r.batch_size,
                tolerance_de=r.tolerance_de, requested_by="test")


def warm_simulated_wells(req, campaigns) -> int:
    return campaign.simulate(req, reader(seed=5), campaigns=campaigns)[-1].wells_used


def test_the_ring_keeps_the_latest_wells_per_dye_set():
    shared = Shared({})
    c, _ = campaign.start(request())
    for i in range(experiment.RING + 10):
        scored = campaign.WellScored.create(
            source="t", subject="x1", sequence=i, experiment_id="x1", iteration=0,
            well=f"W{i}", delta_e=1.0, volumes={"red": 10.0, "yellow": 0.0, "blue": 90.0},
            rgb=[i % 256, 0, 0])
        c.read_at[(0, f"W{i}")] = i
        experiment.remember(shared, c, [scored], partition=1)
    other = ExperimentRequested.create(source="t", subject="x9", sequence=1,
                                       **{**request_fields(), "experiment_id": "x9"})
    warm = experiment.warm_start(shared, other, 10_000)
    assert len(warm) == experiment.RING
    assert warm[-1].rgb8 == ((experiment.RING + 9) % 256, 0, 0)


def test_inputs_before_their_request_wait_for_it():
    """After a takeover the replayed request can come after readings produced since."""
    shared = Shared({})
    req = request()
    state, _ = experiment.handle(None, req, Record("t", 0, 1, b"x1", b"", 1), shared)
    state, out = experiment.handle(state, reserved(req), Record("t", 0, 2, b"x1", b"", 2), shared)
    run = next(e for e in out if isinstance(e, RobotRunRequested))
    events = [*readings_of(run, reader(seed=3)), finished(run)]
    waiting = None
    for i, e in enumerate(events):
        waiting, nothing = experiment.handle(waiting, e, Record("t", 0, 10 + i, b"x1", b"", 5),
                                             shared)
        assert nothing == [] and "campaign" not in waiting
    waiting = json_round_trip(waiting)
    pending, nothing = experiment.handle(waiting, req, Record("t", 0, 1, b"x1", b"", 1),
                                         Shared({}))
    assert nothing == []
    _, replayed = experiment.handle(json_round_trip(pending), reserved(req),
                                    Record("t", 0, 2, b"x1", b"", 2), Shared({}))
    direct = list(out)
    state = json_round_trip(state)
    for i, e in enumerate(events):
        state, more = experiment.handle(state, e, Record("t", 0, 10 + i, b"x1", b"", 5),
                                        Shared({}))
        direct += more
    assert [x.event_id for x in replayed] == [x.event_id for x in direct]
