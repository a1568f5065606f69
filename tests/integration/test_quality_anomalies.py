"""Quality and anomalies on the real broker: readings of a device registered with specs get their
quality and rule on lab.measurements.validated (the running validator); `process anomalies`
flags a spike (AnomalyDetected on lab.alerts) and not the normal readings; killed with kill -9
and restarted, it flags the next spike at once: its rolling window came back from the Table's
changelog (the restarted worker handled that one reading only, and the warm-up is longer than
one reading)."""

from __future__ import annotations

import random
import signal
import time
import uuid

import requests

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    AnomalyDetected,
    DeviceRegistered,
    MeasurementRecorded,
    MeasurementValidated,
)
from labbus.events.topics import (
    ALERTS,
    DEVICES,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_VALIDATED,
    group_id,
    topic_name,
)
from tests.conftest import read_topic, run, wait_for

TAG = uuid.uuid4().hex[:6]
DEVICE = f"qa-{TAG}"
STRANGER = f"qa-unregistered-{TAG}"
KELVIN = f"qa-kelvin-{TAG}"  # registered with its temperature in K
WARMUP = 25


def registration(device: str = DEVICE, unit: str = "degC") -> DeviceRegistered:
    return DeviceRegistered.create(
        source="test", subject=device, sequence=1, device_id=device, device_type="thermometer",
        model="m", location="lab", metrics=["temperature"], spec_version=1,
        specs=[{"metric": "temperature", "unit": unit, "min": 15.0, "max": 30.0,
                "expected_interval_s": 1.0}])


def reading(device: str, seq: int, value: float, unit: str = "degC") -> MeasurementRecorded:
    return MeasurementRecorded.create(source="test", subject=device, sequence=seq,
                                      device_id=device, metric="temperature", value=value,
                                      unit=unit)


async def publish(cfg, topic_spec, events) -> None:
    codec = default_codec()
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        for e in events:  # in order: a device's readings keep their order on its partition
            await producer.send_and_wait(topic_name(cfg, topic_spec), codec.encode(e), key=e.key)
    finally:
        await producer.stop()


def validated(cfg) -> dict[str, MeasurementValidated]:
    codec = default_codec()
    out = {}
    for r in run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_VALIDATED))):
        if r.key and r.key.decode(errors="replace").endswith(TAG):
            e = codec.decode(r.value)
            out[str(e.measurement_id)] = e
    return out


def alerts(cfg) -> list[AnomalyDetected]:
    codec = default_codec()
    return [codec.decode(r.value) for r in run(read_topic(cfg, topic_name(cfg, ALERTS)))
            if r.key == DEVICE.encode()]


async def validated_ends(cfg) -> dict:
    from aiokafka import TopicPartition

    topic = topic_name(cfg, MEASUREMENTS_VALIDATED)
    consumer = kafka.consumer(cfg, group=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(MEASUREMENTS_VALIDATED.partitions)]
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def committed_at_end(cfg) -> dict | None:
    """The end offsets of the validated partitions once the anomaly group's commits reached
    them all, else None."""
    topic = topic_name(cfg, MEASUREMENTS_VALIDATED)
    admin = kafka.admin(cfg)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id(cfg, "anomalies"))
    finally:
        await admin.close()
    done = {tp: m.offset for tp, m in offsets.items() if tp.topic == topic}
    ends = await validated_ends(cfg)
    if all(end == 0 or done.get(tp, -1) >= end for tp, end in ends.items()):
        return ends
    return None


def events_in(proc) -> float:
    text = requests.get(proc.metrics_url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("labbus_events_in_total{") and 'process="anomalies"' in line)


def test_quality_on_validated_readings_and_spikes_flagged_across_a_kill_9(cfg, processes):
    started = time.monotonic()
    run(kafka.ensure_topics(cfg))
    run(publish(cfg, DEVICES, [registration(), registration(KELVIN, "K")]))
    env = {"LABBUS_ANOMALY_WARMUP": str(WARMUP), "LABBUS_ANOMALY_THRESHOLD": "5",
           # one name across the restart (static membership): the restarted worker takes the
           # killed one's partitions at once instead of waiting out its 10 s session
           "LABBUS_GROUP_INSTANCE_ID": "anomalies-0"}
    processes.start("process", "validate")
    first = processes.start("process", "anomalies", extra_env=env)

    rng = random.Random(7)
    normal = [reading(DEVICE, 100 + i, rng.gauss(21.0, 0.1)) for i in range(40)]
    out_of_spec = reading(DEVICE, 200, 35.0)  # in the validator's range, not in the device's
    replayed_seq = reading(DEVICE, 150, 21.05)  # sequence below the last one
    wrong_unit = reading(KELVIN, 1, 21.0)  # degC, which the validator takes; the spec says K
    stranger = reading(STRANGER, 1, 21.0)
    spike = reading(DEVICE, 300, 23.0)  # inside the spec, ~20 sigma off the window
    more = [reading(DEVICE, 301 + i, rng.gauss(21.0, 0.1)) for i in range(5)]
    run(publish(cfg, MEASUREMENTS_RECORDED,
                [*normal, out_of_spec, replayed_seq, wrong_unit, stranger, spike, *more]))

    expected = {e.event_id: q for e, q in [
        *((e, ("good", None)) for e in normal), (out_of_spec, ("bad", "range")),
        (replayed_seq, ("suspect", "sequence")), (wrong_unit, ("bad", "unit")),
        (stranger, ("suspect", "no_spec")), (spike, ("good", None)),
        *((e, ("good", None)) for e in more)]}
    def all_validated():
        found = validated(cfg)
        return found if len(found) == len(expected) else None

    got = wait_for(all_validated, 90, "every reading validated")
    assert {uuid.UUID(k): (v.quality, v.quality_rule) for k, v in got.items()} == expected

    (alert,) = wait_for(lambda: alerts(cfg), 90, "the spike's alert")
    assert alert.measurement_id == spike.event_id and alert.rule == "zscore"
    assert alert.score > alert.threshold == 5.0
    # the window before the spike: the normal readings and the suspect one; bad ones not counted
    assert alert.window_count == len(normal) + 1
    assert abs(alert.window_mean - 21.0) < 0.1

    at_kill = wait_for(lambda: run(committed_at_end(cfg)), 30,
                       "the anomaly group's commits at the end")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = processes.start("process", "anomalies", extra_env=env)
    spike2 = reading(DEVICE, 400, 19.0)
    run(publish(cfg, MEASUREMENTS_RECORDED, [spike2]))
    found = wait_for(lambda: [a for a in alerts(cfg) if a.measurement_id == spike2.event_id],
                     90, "the spike after the restart flagged")
    (again,) = found
    # the window the restarted worker judged it by: everything before the kill (the first spike
    # entered it clipped), though it handled only this one reading; WARMUP > 1
    assert again.window_count == alert.window_count + 1 + len(more)
    # it handled only what was appended after the commits it found (the spike; and whatever
    # the validator appended again), none of the records before them; faust may deliver a
    # record a second time before its first commit (at-least-once), hence at most twice
    after_kill = sum(run(validated_ends(cfg)).values()) - sum(at_kill.values())
    assert after_kill >= 1 and after_kill <= events_in(second) <= 2 * after_kill
    assert 2 * after_kill < sum(at_kill.values())  # so re-reading the log would show
    assert len(alerts(cfg)) == 2  # normal readings never flagged, nothing re-flagged
    print(f"\nquality + anomalies scenario incl. kill -9 and restart: "
          f"{time.monotonic() - started:.1f} s")
