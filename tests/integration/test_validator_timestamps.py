"""Readings with device timestamps the read models cannot hold (year 1, -2^62 µs, year 10000 and
beyond) or older than the horizon are rejected by the running validator, with a reason; they
never reach lab.measurements.validated, where they crashed both projectors."""

import time
import uuid

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import MeasurementRecorded
from labbus.events.topics import (
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    topic_name,
)
from tests.conftest import read_topic, run, wait_for

DAY_US = 86_400_000_000
# device -> (device timestamp in µs since the epoch, expected reason code or None)
CASES = {
    "tsx-year-1": (-62_135_596_800_000_000, "unrepresentable_timestamp"),
    "tsx-minus-2-62": (-2**62, "unrepresentable_timestamp"),
    "tsx-min-long": (-2**63, "unrepresentable_timestamp"),
    "tsx-year-10000": (253_402_300_800_000_000, "unrepresentable_timestamp"),
    "tsx-plus-2-62": (2**62, "unrepresentable_timestamp"),
    "tsx-epoch": (0, "timestamp_too_old"),  # a device clock reset to 1970, horizon 10 years
    "tsx-year-1900": (-2_208_988_800_000_000, "timestamp_too_old"),
    "tsx-year-2500": (16_725_225_600_000_000, "future_timestamp"),
}


def record(codec, device: str, at_us: int) -> bytes:
    event = MeasurementRecorded.create(source="tsx-agent", subject=device, sequence=1,
                                       device_id=device, metric="temperature", value=21.5,
                                       unit="degC")
    _, plain = codec.decode_record(codec.encode(event), plain=True)
    plain["occurred_at"] = at_us
    return codec.encode_plain(MeasurementRecorded.TYPE, plain)


def test_timestamps_the_read_models_cannot_hold_are_rejected(cfg, processes):
    codec = default_codec()
    now_us = time.time_ns() // 1000
    cases = dict(CASES, **{"tsx-yesterday": (now_us - DAY_US, None),  # good
                           "tsx-now": (now_us, None)})  # good

    async def send():
        producer = kafka.producer(cfg)
        await producer.start()
        try:
            for device, (at_us, _) in cases.items():
                await producer.send_and_wait(topic_name(cfg, MEASUREMENTS_RECORDED),
                                             record(codec, device, at_us), key=device.encode())
        finally:
            await producer.stop()

    run(kafka.ensure_topics(cfg))
    run(send())
    processes.start("process", "validate")

    def decisions():
        out = {}
        for spec in (MEASUREMENTS_VALIDATED, MEASUREMENTS_REJECTED):
            for r in run(read_topic(cfg, topic_name(cfg, spec))):
                if r.key.startswith(b"tsx-"):
                    out[r.key.decode()] = codec.decode(r.value)  # datetimes: must all decode
        return out if len(out) == len(cases) else None

    got = wait_for(decisions, 120, "a decision for every reading")
    for device, (at_us, code) in cases.items():
        event = got[device]
        if code is None:
            assert type(event).__name__ == "MeasurementValidated", (device, event)
            continue
        assert type(event).__name__ == "MeasurementRejected", (device, event)
        assert event.reason_code == code, (device, event.reason)
        if code == "unrepresentable_timestamp":
            assert str(at_us) in event.reason and "read models" in event.reason
            assert event.measured_at.year >= 2024  # the decision time, not the device's value
        print(f"{device}: {event.reason_code}: {event.reason}")
    assert all(isinstance(e.event_id, uuid.UUID) for e in got.values())
