"""One runtime contract, run against every processor and agent started as a user starts them:

- an undecodable record is dead-lettered once (original bytes, source position) and processing
  continues: one record, or, where a spec resends identical ids, one event id however often an
  expired session makes the process handle it again;
- a process's outputs are on the broker before its input offsets are committed;
- after kill -9 mid-stream and a restart, every input gets its outputs and the process is
  deciding again within seconds. What a restart may re-emit differs, and each spec says it:
  `resends="none"` (nothing already in the log is sent again) or `resends="identical ids"`
  (an output may be sent again under the same event id, which every view drops).

Each test runs in a namespace of its own (`own_cfg`): its readers go through its own inputs and
outputs, not the session's whole topics.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import TopicPartition

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    CommandIssued,
    DeadLetter,
    Event,
    ExperimentRequested,
    MeasurementRecorded,
    RobotRunRequested,
    WellDispensed,
    derived_id,
)
from labbus.events.topics import (
    COLOUR_READINGS,
    COMMANDS,
    DEAD_LETTER,
    EXPERIMENTS,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_VALIDATED,
    ROBOT_RUNS,
    TopicSpec,
    group_id,
    topic_name,
)
from tests.conftest import read_topic, run, wait_for


@dataclass(frozen=True)
class Spec:
    args: tuple[str, ...]  # the `labbus` command
    process: str  # its name: consumer group, failed_by of its dead letters
    source: TopicSpec
    sink: TopicSpec
    make: Callable[[str, int], Event]  # (tag, i) -> an input
    output_id: Callable[[Event], str]  # the id of the output an input leads to
    resends: str  # "none" or "identical ids"
    count: int  # inputs per stream
    startup_s: float = 60  # first start may import heavy libraries
    # the id of the event on the source topic whose handling emits the output, when it is not
    # the input itself (a campaign starts on its request's QuotaReserved, which the companion
    # quota processor writes later; the request alone is kept in the Table, no output)
    trigger_id: Callable[[Event], str] | None = None


def reading(tag: str, i: int) -> Event:
    device = f"{tag}-{i % 3}"
    return MeasurementRecorded.create(source="t", subject=device, sequence=i, device_id=device,
                                      metric="temperature", value=20.0 + i % 7, unit="degC")


def dispensed(tag: str, i: int) -> Event:
    return WellDispensed.create(source="t", subject=f"{tag}-x", sequence=i, run_id=f"{tag}-run",
                                experiment_id=f"{tag}-x", iteration=0, well=f"A{i + 1}",
                                volumes={"red": 40.0 + i, "blue": 60.0, "water": 100.0})


def run_request(tag: str, i: int) -> Event:
    from labbus.events.ot2_protocol import WellRecipe, generate_protocol, protocol_hash

    recipes = [{"well": "A1", "volumes": {"red": 60.0 + i, "blue": 40.0}, "water_ul": 100.0 - i}]
    text = generate_protocol([WellRecipe(r["well"], r["volumes"], r["water_ul"])
                              for r in recipes], ["red", "yellow", "blue"])
    return RobotRunRequested.create(source="t", subject=f"{tag}-x{i}", sequence=1,
                                    run_id=f"{tag}-run{i}", experiment_id=f"{tag}-x{i}",
                                    iteration=0, protocol_hash=protocol_hash(text),
                                    protocol_text=text, recipes=recipes)


def command_for_unknown_device(tag: str, i: int) -> Event:
    device = f"{tag}-ghost-{i % 3}"
    return CommandIssued.create(
        source="t", subject=device, sequence=i, command_id=f"{tag}-cmd-{i}", device_id=device,
        idempotency_key=f"k{i}", command_type="measure", payload_json="{}",
        expires_at=datetime.now(UTC) + timedelta(hours=1), issued_by="t")


def experiment_request(tag: str, i: int) -> Event:
    xid = f"{tag}-{i}"
    return ExperimentRequested.create(
        source="t", subject=xid, sequence=1, experiment_id=xid, target_hex=None,
        # red+yellow: test_experiment_instances compares red+blue campaigns with the pure
        # simulation, which learns from no other campaign of the session
        target_lab=[50.0, 10.0 + i % 5, -20.0], dyes=["red", "yellow"], budget_wells=16,
        batch_size=4, tolerance_de=2.0, requested_by="t")


SPECS = [
    Spec(("process", "validate"), "validator", MEASUREMENTS_RECORDED, MEASUREMENTS_VALIDATED,
         reading, lambda e: derived_id(e.event_id, "validated"), "identical ids", 3000),
    Spec(("agent", "reader"), "agent-reader", ROBOT_RUNS, COLOUR_READINGS, dispensed,
         lambda e: derived_id(e.event_id, "measured"), "identical ids", 60),
    Spec(("agent", "ot2", "--simulate"), "agent-ot2", ROBOT_RUNS, ROBOT_RUNS, run_request,
         lambda e: derived_id(e.run_id, "finished"), "none", 4),
    # each request leads to a first proposal; state lives in faust Tables (a re-handled input
    # after kill -9 re-emits the same ids)
    Spec(("process", "experiment"), "experiment", EXPERIMENTS, EXPERIMENTS, experiment_request,
         lambda e: derived_id(e.event_id, "proposed/0"), "identical ids", 40,
         trigger_id=lambda e: derived_id(e.event_id, "quota-reserved")),
    # each command for an unknown device is rejected (state per device, a view of lab.devices)
    Spec(("process", "devices"), "devices", COMMANDS, COMMANDS, command_for_unknown_device,
         lambda e: derived_id(e.event_id, "rejected"), "identical ids", 40),
]


async def publish(cfg, spec: Spec, values: list[tuple[bytes, bytes]]) -> None:
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        topic = topic_name(cfg, spec.source)
        await asyncio.gather(*[await producer.send(topic, v, key=k) for k, v in values])
    finally:
        await producer.stop()


def inputs(spec: Spec, tag: str, n: int, start: int = 0) -> list[Event]:
    return [spec.make(tag, i) for i in range(start, start + n)]


def encoded(events: list[Event]) -> list[tuple[bytes, bytes]]:
    codec = default_codec()
    return [(e.key, codec.encode(e)) for e in events]


def output_ids(cfg, spec: Spec) -> Counter:
    codec = default_codec()
    found = Counter()
    for r in run(read_topic(cfg, topic_name(cfg, spec.sink))):
        try:
            _, plain = codec.decode_record(r.value, plain=True)
        except ValueError:
            continue  # a test's junk
        found[plain["event_id"]] += 1
    return found


def dead_letters(cfg, spec: Spec, junk: bytes) -> list[DeadLetter]:
    codec = default_codec()
    letters = [codec.decode(r.value) for r in run(read_topic(cfg, topic_name(cfg, DEAD_LETTER)))]
    return [d for d in letters if d.failed_by == spec.process and d.original_value == junk]


async def committed(cfg, spec: Spec) -> dict[TopicPartition, int]:
    admin = kafka.admin(cfg)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id(cfg, spec.process))
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic_name(cfg, spec.source) and meta.offset >= 0}


def positions_of(cfg, spec: Spec, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """event id -> (partition, offset) of the inputs with these ids."""
    codec = default_codec()
    where = {}
    for r in run(read_topic(cfg, topic_name(cfg, spec.source))):
        try:
            _, plain = codec.decode_record(r.value, plain=True)
        except ValueError:
            continue
        if plain["event_id"] in wanted:
            where[plain["event_id"]] = (r.partition, r.offset)
    return where


@pytest.fixture(params=SPECS, ids=lambda s: s.process)
def spec(request) -> Spec:
    return request.param


def test_an_undecodable_record_is_dead_lettered_once_and_processing_continues(
        own_cfg, processes, spec):
    cfg = own_cfg
    tag = f"rt-junk-{uuid.uuid4().hex[:6]}"
    junk = f"not avro {tag}".encode()
    first = inputs(spec, tag, 2)
    run(publish(cfg, spec, [(first[0].key, junk)] + encoded(first)))
    proc = processes.start(*spec.args)
    wanted = {spec.output_id(e) for e in first}
    wait_for(lambda: wanted <= set(output_ids(cfg, spec)), spec.startup_s,
             "the outputs of the inputs after the junk")
    letters = wait_for(lambda: dead_letters(cfg, spec, junk), 10, "the dead letter")
    assert_one_dead_letter(spec, letters)
    assert letters[0].source_topic == topic_name(cfg, spec.source)
    assert letters[0].error_type and letters[0].error
    proc.terminate()
    assert proc.wait(30) == 0
    later = inputs(spec, tag, 1, start=2)  # after a restart the junk is not sent again
    run(publish(cfg, spec, encoded(later)))
    proc = processes.start(*spec.args)
    wait_for(lambda: spec.output_id(later[0]) in output_ids(cfg, spec), spec.startup_s,
             "the output after the restart")
    assert_one_dead_letter(spec, dead_letters(cfg, spec, junk))
    assert proc.poll() is None


def assert_one_dead_letter(spec: Spec, letters: list[DeadLetter]) -> None:
    """One dead letter for the junk, as its spec guarantees it: exactly one record for
    `resends="none"`; for `resends="identical ids"` (at-least-once: an input handled but not
    yet committed when the group's session expires, e.g. on a loaded machine, is handled again
    after the rebalance) one or more records that are one event, the id derived from the source
    position (events/dead_letter.py), which is what a reader of dead letters deduplicates by."""
    assert letters
    if spec.resends == "none":
        assert len(letters) == 1, letters
    assert len({d.event_id for d in letters}) == 1, [str(d.event_id) for d in letters]
    assert len({(d.source_topic, d.source_partition, d.source_offset) for d in letters}) == 1


def test_outputs_are_on_the_broker_before_the_input_is_committed(own_cfg, processes, spec):
    cfg = own_cfg
    tag = f"rt-ack-{uuid.uuid4().hex[:6]}"
    events = inputs(spec, tag, spec.count)
    run(publish(cfg, spec, encoded(events)))
    trigger = spec.trigger_id or (lambda e: str(e.event_id))
    expected = {trigger(e): spec.output_id(e) for e in events}
    where = positions_of(cfg, spec, set(expected))
    processes.start(*spec.args)
    deadline, samples, checked = time.monotonic() + 120, 0, 0
    while time.monotonic() < deadline:
        if len(where) < len(expected):  # triggers written by a companion process
            where = positions_of(cfg, spec, set(expected))
        marks = run(committed(cfg, spec))  # first the commits, then the outputs
        present = set(output_ids(cfg, spec))
        for event_id, (partition, offset) in where.items():
            tp = TopicPartition(topic_name(cfg, spec.source), partition)
            if offset < marks.get(tp, 0):
                assert expected[event_id] in present, \
                    f"input at {partition}/{offset} committed before its output was on the broker"
                checked += 1
        samples += 1
        if len(where) == len(expected) and set(expected.values()) <= present and all(
                offset < marks.get(TopicPartition(topic_name(cfg, spec.source), p), 0)
                for p, offset in where.values()):
            break
        time.sleep(0.3)
    assert set(expected.values()) <= set(output_ids(cfg, spec))
    assert checked > 0 and samples > 1


def test_kill_9_mid_stream_then_restart(own_cfg, processes, spec):
    cfg = own_cfg
    tag = f"rt-kill-{uuid.uuid4().hex[:6]}"
    events = inputs(spec, tag, spec.count)
    expected = {spec.output_id(e) for e in events}
    run(publish(cfg, spec, encoded(events)))
    # one name across the restart (static membership, KIP-345): the restarted process takes the
    # killed one's partitions at once instead of waiting out its 10 s session
    member = {"LABBUS_GROUP_INSTANCE_ID": f"{spec.process}-0"}
    proc = processes.start(*spec.args, extra_env=member)
    wait_for(lambda: len(expected & set(output_ids(cfg, spec))) >= max(1, spec.count // 4),
             spec.startup_s, "some outputs before the kill")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    more = inputs(spec, tag, max(1, spec.count // 4), start=spec.count)
    run(publish(cfg, spec, encoded(more)))
    restarted = time.monotonic()
    processes.start(*spec.args, extra_env=member)
    probe = {spec.output_id(e) for e in more}
    wait_for(lambda: probe & set(output_ids(cfg, spec)), 60, "an output after the restart")
    recovery = time.monotonic() - restarted
    expected |= {spec.output_id(e) for e in more}
    wait_for(lambda: expected <= set(output_ids(cfg, spec)), 120, "every output")
    found = output_ids(cfg, spec)
    resent = sum(found[i] - 1 for i in expected)
    print(f"{spec.process}: deciding again {recovery:.1f} s after the restart; "
          f"{resent} outputs re-sent under their id")
    assert recovery < 20, f"{spec.process} took {recovery:.1f} s to decide again"
    if spec.resends == "none":
        assert resent == 0
