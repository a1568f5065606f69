"""A duplicate of a reading seen before a validator restart is still rejected as a duplicate."""

import asyncio

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.topics import (
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    topic_name,
)
from labbus.producers import sim
from tests.conftest import read_topic, run, wait_for


def count(cfg, spec, prefix):
    codec = default_codec()
    return [codec.decode(r.value) for r in run(read_topic(cfg, topic_name(cfg, spec)))
            if r.key.decode().startswith(prefix)]


def test_duplicate_across_restart_is_rejected(cfg, processes):
    simulator = sim.FleetSimulator(sim.make_fleet(3, seed=5, prefix="rst"), seed=5)
    summary = run(sim.publish(cfg, simulator, 300, rate=0))
    validator = processes.start("process", "validate")
    wait_for(lambda: len(count(cfg, MEASUREMENTS_VALIDATED, "rst")) == summary.good, 90,
             "the first readings validated")
    validator.terminate()
    validator.wait(30)
    # let faust's final commit land, then re-send an early reading, as a flaky agent would
    first = next(r for r in run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_RECORDED)))
                 if r.key.startswith(b"rst"))

    async def resend():
        producer = kafka.producer(cfg)
        await producer.start()
        await producer.send_and_wait(topic_name(cfg, MEASUREMENTS_RECORDED), first.value,
                                     key=first.key)
        await producer.stop()

    asyncio.run(resend())
    processes.start("process", "validate")
    rejected = wait_for(lambda: count(cfg, MEASUREMENTS_REJECTED, "rst"), 90, "the rejection")
    assert [r.reason_code for r in rejected] == ["duplicate_event_id"]
    assert len(count(cfg, MEASUREMENTS_VALIDATED, "rst")) == summary.good
