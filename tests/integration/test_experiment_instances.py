"""Two experiment processors share the campaigns: 50 campaigns, one processor killed with kill -9
mid-way; every campaign gets the verdict the pure campaign functions give, decided by one
processor. And the restart time with 10,000 finished campaigns in the log.

The robot and the plate reader are played by the test (`Responder`): it answers each
RobotRunRequested with RobotRunFinished and one noise-free WellColourMeasured per well, as
`campaign.simulate` does, so the expected verdicts are those of `campaign.simulate`."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
import urllib.request
import uuid
from collections import Counter, defaultdict

import numpy as np
from aiokafka import TopicPartition

from labbus.deploy import experiment as exp
from labbus.events import kafka
from labbus.events.codec import DecodeError, default_codec
from labbus.events.model import (
    ExperimentRequested,
    RobotRunFinished,
    RobotRunRequested,
    WellColourMeasured,
    derived_id,
)
from labbus.events.topics import (
    COLOUR_READINGS,
    EXPERIMENTS,
    ROBOT_RUNS,
    group_id,
    topic_name,
)
from labbus.processors import campaign
from labbus.processors.colour.recipes import random_feasible_recipe
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab
from tests.conftest import read_topic

DYES = ["red", "blue"]  # a dye set of its own: other tests in the session learn nothing from these
MODEL = PlateReaderModel(noise_sigma=0.0, seed=None)


def read(volumes):
    rgb = MODEL.read(volumes)
    return rgb, [float(v) for v in rgb_to_lab(rgb)]


def requests(n: int, prefix: str, seed: int = 11) -> list[ExperimentRequested]:
    """Reachable targets (the colour of a random feasible recipe), every tenth out of gamut."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        xid = f"{prefix}-{i:03d}"
        if i % 10 == 9:
            target, budget = [40.0, 60.0, -75.0], 16  # #7a3cc0-like purple: out of gamut
        else:
            rgb = np.asarray(MODEL.true_rgb(random_feasible_recipe(DYES, rng))) * 255.0
            target, budget = [float(v) for v in rgb_to_lab(rgb)], 48
        out.append(ExperimentRequested.create(
            source="test", subject=xid, sequence=1, experiment_id=xid, target_hex=None,
            target_lab=target, dyes=DYES, budget_wells=budget, batch_size=8, tolerance_de=2.0,
            requested_by="test"))
    return out


def verdict_of(events) -> tuple:
    final = [e for e in events if isinstance(e, exp.FINAL)]
    assert len(final) == 1, final
    v = final[0]
    return (type(v).__name__, getattr(v, "wells_used", None), getattr(v, "best_well", None),
            None if getattr(v, "best_de", None) is None else round(v.best_de, 9))


class Responder:
    """Plays the OT-2 agent and the plate reader: answers every RobotRunRequested once."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.codec = default_codec()
        self.answered: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        runs_topic = topic_name(self.cfg, ROBOT_RUNS)
        consumer = kafka.consumer(self.cfg, group=None)
        producer = kafka.producer(self.cfg)
        await consumer.start()
        await producer.start()
        try:
            tps = [TopicPartition(runs_topic, p) for p in range(ROBOT_RUNS.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                sent = []
                for records in batch.values():
                    for r in records:
                        event = decoded(self.codec, r)
                        if not isinstance(event, RobotRunRequested):
                            continue
                        if event.run_id in self.answered:
                            continue
                        self.answered.add(event.run_id)
                        for topic, out in self.answer(event):
                            sent.append(await producer.send(topic, self.codec.encode(out),
                                                            key=out.key))
                if sent:
                    await asyncio.gather(*sent)
        finally:
            await consumer.stop()
            await producer.stop()

    def answer(self, run: RobotRunRequested):
        for event in answers(run):
            spec = ROBOT_RUNS if isinstance(event, RobotRunFinished) else COLOUR_READINGS
            yield topic_name(self.cfg, spec), event


def answers(run: RobotRunRequested) -> list:
    """What the robot and the reader say about a run: a reading per well, then the run's end."""
    t = dict(source="test-robot", subject=run.experiment_id, sequence=0,
             experiment_id=run.experiment_id, run_id=run.run_id, iteration=run.iteration)
    out: list = []
    for r in run.recipes:
        rgb, lab = read({**r["volumes"], "water": r["water_ul"]})
        out.append(WellColourMeasured.create(
            **t, event_id=uuid.UUID(derived_id(run.run_id, f"read/{r['well']}")),
            well=r["well"], rgb=list(rgb), lab=lab, instrument_id="test"))
    out.append(RobotRunFinished.create(
        **t, event_id=uuid.UUID(derived_id(run.run_id, "finished")), commands=1,
        wells=len(run.recipes)))
    return out


async def group_members(cfg, process: str = "experiment") -> tuple[str, int]:
    admin = kafka.admin(cfg)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group_id(cfg, process)])
        group = described[0].groups[0]
        return group[2], len(group[5])  # state, members
    finally:
        await admin.close()


async def wait_stable(cfg, members: int, timeout: float = 60.0,
                      process: str = "experiment") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, n = await group_members(cfg, process)
        if state == "Stable" and n == members:
            await asyncio.sleep(2)  # faust finishes its table recovery after the assignment
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the {process} group never had {members} stable members")


def partitions_processed(proc) -> set[int]:
    text = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
    found = set()
    for line in text.splitlines():
        if line.startswith("labbus_consumer_lag{") and ".lab.experiments\"" in line:
            found.add(int(line.split('partition="')[1].split('"')[0]))
    return found


def content(event) -> tuple:
    env = event.envelope
    return (env.event_id, env.event_type, env.source, env.subject, env.causation_id,
            env.sequence, tuple((f.name, repr(getattr(event, f.name)))
                                for f in dataclasses.fields(event) if f.name != "envelope"))


def decoded(codec, record):
    """The event, or None for junk other tests of the session put on the topic."""
    try:
        return codec.decode(record.value)
    except DecodeError:
        return None


async def verdicts_so_far(cfg, ids) -> dict[str, object]:
    """The verdicts given so far to the experiments `ids` (the topic holds other tests' too)."""
    codec = default_codec()
    out = {}
    for r in await read_topic(cfg, topic_name(cfg, EXPERIMENTS)):
        e = decoded(codec, r)
        if isinstance(e, exp.FINAL) and e.experiment_id in ids:
            out[e.experiment_id] = e
    return out


def test_two_processors_share_50_campaigns_and_a_kill_changes_no_verdict(cfg, processes):
    reqs = requests(50, "duo")
    expected = {r.experiment_id: verdict_of(campaign.simulate(r, read)) for r in reqs}
    kinds = Counter(v[0] for v in expected.values())
    assert kinds["ExperimentCompleted"] >= 40 and kinds["ExperimentFailed"] >= 5, kinds

    first = processes.start("process", "experiment")
    second = processes.start("process", "experiment")

    async def scenario() -> tuple[set[int], set[int], float]:
        await kafka.ensure_topics(cfg)
        await wait_stable(cfg, 2)
        await exp.publish(cfg, *reqs)  # all requested before any well is read: none learns
        stop = asyncio.Event()
        responder = asyncio.ensure_future(Responder(cfg).run(stop))
        started = time.monotonic()
        try:
            while len(await verdicts_so_far(cfg, expected)) < 15:
                assert time.monotonic() - started < 300, "no progress"
                await asyncio.sleep(0.5)
            owned = partitions_processed(first), partitions_processed(second)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            killed_at = len(await verdicts_so_far(cfg, expected))
            while len(await verdicts_so_far(cfg, expected)) < len(reqs):
                assert time.monotonic() - started < 400, "campaigns not finished"
                await asyncio.sleep(1)
            print(f"\n50 campaigns on two processors, one killed after {killed_at} verdicts: "
                  f"{time.monotonic() - started:.1f} s")
        finally:
            stop.set()
            await responder
        return (*owned, killed_at)

    owned_first, owned_second, killed_at = asyncio.run(scenario())
    assert killed_at < 50, "every campaign ended before the kill"
    # before the kill each input partition was processed by one of them
    assert owned_first and owned_second and not owned_first & owned_second, (owned_first,
                                                                            owned_second)
    assert owned_first | owned_second == {0, 1, 2}

    codec = default_codec()
    records = (asyncio.run(read_topic(cfg, topic_name(cfg, EXPERIMENTS)))
               + asyncio.run(read_topic(cfg, topic_name(cfg, ROBOT_RUNS))))
    by_xid: dict[str, list] = defaultdict(list)
    outputs = defaultdict(list)
    for r in records:
        e = decoded(codec, r)
        if e is not None and e.envelope.source == "experiment" and e.experiment_id in expected:
            by_xid[e.experiment_id].append(e)
            outputs[e.event_id].append((r.partition, e))
    got = {xid: verdict_of(events) for xid, events in by_xid.items()}
    assert got == expected
    # no output written twice, except identical re-emits of the input the killed processor was
    # handling (at-least-once: its outputs acknowledged, its state not yet)
    repeated = {i: es for i, es in outputs.items() if len(es) > 1}
    for copies in repeated.values():
        assert len({content(e) for _, e in copies}) == 1, "a re-emitted event differs"
        assert {p for p, _ in copies} <= owned_first, "a repeat from the surviving processor"
    assert len({es[0][1].experiment_id for es in repeated.values()}) <= 1, repeated
    print(f"outputs: {len(outputs)}, re-emitted after the kill: {len(repeated)}")
