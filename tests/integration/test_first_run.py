"""`run_consumer(first_run_since_ms=...)` against the real broker: a group that has never
committed starts at the records of that time, not at the beginning of the topic (what a SiLA 2
bridge's first run relies on: lab.commands holds every other device's history); once the group
has committed, its offsets decide."""

from __future__ import annotations

import asyncio
import time
import uuid

from labbus.events import kafka
from labbus.events.model import ExperimentRejected
from labbus.events.runtime import run_consumer
from labbus.events.topics import EXPERIMENTS
from tests.conftest import run


def _rejected(reason: str) -> ExperimentRejected:
    xid = f"fr-{uuid.uuid4().hex[:8]}"
    return ExperimentRejected.create(source="fr-test", subject=xid, sequence=0,
                                     experiment_id=xid, reason=reason)


async def _consume(cfg, process: str, since_ms: int | None, expect: int) -> list[str]:
    seen: list[str] = []
    stop = asyncio.Event()

    def handler(event, _record) -> None:
        seen.append(event.reason)
        if len(seen) >= expect:
            stop.set()

    task = asyncio.create_task(run_consumer(cfg, process, [EXPERIMENTS], handler, stop,
                                            first_run_since_ms=since_ms))
    try:
        await asyncio.wait_for(stop.wait(), 60)
        await asyncio.sleep(1)  # anything more would come now
    finally:
        stop.set()
        await task
    return seen


def test_a_first_run_starts_at_the_given_time_and_a_later_one_at_its_offsets(own_cfg):
    cfg = own_cfg
    run(kafka.publish(cfg, *[_rejected(f"old {i}") for i in range(5)]))
    time.sleep(0.05)
    since_ms = int(time.time() * 1000)
    time.sleep(0.05)
    run(kafka.publish(cfg, *[_rejected(f"new {i}") for i in range(3)]))
    process = f"first-run-{uuid.uuid4().hex[:6]}"
    assert sorted(run(_consume(cfg, process, since_ms, 3))) == ["new 0", "new 1", "new 2"]
    # committed now: the time is not looked at again, only what came since is handed over
    run(kafka.publish(cfg, _rejected("newer")))
    assert run(_consume(cfg, process, since_ms, 1)) == ["newer"]
    # without a time, a new group reads from the beginning
    assert len(run(_consume(cfg, f"{process}-all", None, 9))) == 9
