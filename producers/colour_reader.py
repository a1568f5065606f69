"""The colour reader agent: photographs each dispensed well with the simulated plate reader.

Consumes WellDispensed, publishes WellColourMeasured (8-bit sRGB and CIELAB). The camera noise is
seeded from the id of the WellDispensed, so re-reading a well after a restart gives the same
reading under the same derived id (views drop the repeat). A handler on the runtime
(labbus.events.runtime.run_consumer).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from labbus.events.model import WellColourMeasured, WellDispensed, derived_id
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab

PROCESS = "agent-reader"
INSTRUMENT = "plate-reader-sim-1"


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


class PlateReader:
    """The handler: WellDispensed in, WellColourMeasured out. `delay_s`: seconds each reading
    takes (a real camera is not instant). A liquid the model does not know raises KeyError, and
    the runtime dead-letters that WellDispensed."""

    accepts = {WellDispensed.TYPE}

    def __init__(self, seed: int = 0, delay_s: float = 0.0) -> None:
        self.seed = seed
        self.delay_s = delay_s
        self.sequence = 0

    async def __call__(self, dispensed: WellDispensed, _record=None) -> list[WellColourMeasured]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.sequence += 1
        return [measure(dispensed, self.seed, self.sequence)]
