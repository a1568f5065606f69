"""Junk on the campaign topics goes to the dead-letter topic once, even across restarts."""

import asyncio
import time

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.topics import DEAD_LETTER, EXPERIMENTS, topic_name
from tests.conftest import read_topic, run, wait_for


def test_undecodable_experiment_message_is_dead_lettered_once(cfg, processes):
    junk = b"\xc3\x01" + b"\x42" * 8 + b"not a schema we know"

    async def publish():
        await kafka.ensure_topics(cfg)
        producer = kafka.producer(cfg)
        await producer.start()
        await producer.send_and_wait(topic_name(cfg, EXPERIMENTS), junk, key=b"junk-exp")
        await producer.stop()

    asyncio.run(publish())
    codec = default_codec()

    def letters():
        return [e for e in (codec.decode(r.value) for r in
                            run(read_topic(cfg, topic_name(cfg, DEAD_LETTER))))
                if e.failed_by == "experiment"]

    first = processes.start("process", "experiment")
    found = wait_for(letters, 60, "the dead letter")
    assert found[0].original_value == junk and found[0].error_type == "unknown_fingerprint"
    assert found[0].source_topic == topic_name(cfg, EXPERIMENTS)
    first.terminate()
    first.wait(30)
    second = processes.start("process", "experiment")
    time.sleep(6)  # it re-reads its inputs from the beginning on start
    assert second.poll() is None
    assert len(letters()) == 1
