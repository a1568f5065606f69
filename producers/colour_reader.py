"""The colour reader agent: photographs each dispensed well with the simulated plate reader.

Consumes WellDispensed, publishes WellColourMeasured (8-bit sRGB and CIELAB). The camera noise is
seeded from the id of the WellDispensed, so re-reading a well after a restart gives the same
reading under the same derived id. Offsets are committed after the readings are on the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

from labbus.events import kafka, metrics
from labbus.events.codec import DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.model import WellColourMeasured, WellDispensed, derived_id
from labbus.events.topics import COLOUR_READINGS, ROBOT_RUNS, group_id, topic_name
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab

PROCESS = "agent-reader"
INSTRUMENT = "plate-reader-sim-1"
log = logging.getLogger(__name__)


def measure(dispensed: WellDispensed, seed: int = 0, sequence: int = 0) -> WellColourMeasured:
    digest = hashlib.sha256(f"{seed}/{dispensed.event_id}".encode()).digest()
    model = PlateReaderModel(seed=int.from_bytes(digest[:8], "little"))
    rgb = model.read(dispensed.volumes)
    lab = [float(v) for v in rgb_to_lab(rgb)]
    return WellColourMeasured.create(
        source=INSTRUMENT, subject=dispensed.experiment_id, sequence=sequence,
        event_id=uuid.UUID(derived_id(dispensed.event_id, "measured")),
        correlation_id=dispensed.envelope.correlation_id, causation_id=dispensed.event_id,
        experiment_id=dispensed.experiment_id, run_id=dispensed.run_id,
        iteration=dispensed.iteration, well=dispensed.well, rgb=list(rgb), lab=lab,
        instrument_id=INSTRUMENT)


async def run(cfg: Config, stop: asyncio.Event, seed: int = 0, delay_s: float = 0.0) -> None:
    """`delay_s`: seconds each reading takes (a real camera is not instant)."""
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    source, sink = topic_name(cfg, ROBOT_RUNS), topic_name(cfg, COLOUR_READINGS)
    consumer = kafka.consumer(cfg, source, group=group_id(cfg, PROCESS), fetch_max_wait_ms=100)
    producer = kafka.producer(cfg)
    await producer.start()
    await consumer.start()
    sequence = 0
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            futures = []
            for tp, records in batch.items():
                metrics.EVENTS_IN.labels(PROCESS, tp.topic).inc(len(records))
                for record in records:
                    try:
                        name, _ = codec.decode_record(record.value, plain=True)
                        if name != WellDispensed.TYPE:
                            continue
                        dispensed = codec.decode(record.value)
                    except DecodeError as exc:
                        log.warning("skipping undecodable record at offset %d: %s",
                                    record.offset, exc)
                        continue
                    if delay_s:
                        await asyncio.sleep(delay_s)
                    sequence += 1
                    try:
                        reading = measure(dispensed, seed, sequence)
                    except KeyError as exc:  # a liquid the reader's model does not know
                        log.warning("cannot read well %s of %s: %s", dispensed.well,
                                    dispensed.experiment_id, exc)
                        continue
                    futures.append(
                        await producer.send(sink, codec.encode(reading), key=reading.key))
                    metrics.EVENTS_OUT.labels(PROCESS, sink).inc()
            if futures:
                await asyncio.gather(*futures)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
