"""Test-protocol benchmark: N service requests x 3 protocols through the whole pipeline
(`process devices`, `process testing`, `process reports`, `agent pv`), each process as its own
principal, in a fresh namespace against `labbus services up`'s broker and a Mongo database of
its own (the reports in GridFS).

    .venv/bin/python tests/bench/bench_testing.py [--requests 5] [--samples 2]

All requests are submitted at once (LABBUS_TESTING_SPEED 1e6: TC200 takes ~2 s). Printed: wall
time from the first submission to the last completion and to the last report, executions/s,
an execution's last reading -> its verdict (ExecutionPassed/Failed) p50/p99, and a request's
completion -> its ReportGenerated(pdf) p50/p99 (recorded_at of the events: one machine's
clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.events import kafka  # noqa: E402
from labbus.events.codec import default_codec  # noqa: E402
from labbus.events.model import (  # noqa: E402
    DeviceStatusChanged,
    ExecutionFailed,
    ExecutionPassed,
    MeasurementRecorded,
    ReportGenerated,
    ServiceRequestCompleted,
    ServiceRequestSubmitted,
    register_sample,
)
from labbus.events.topics import (  # noqa: E402
    DEVICE_STATUS,
    MEASUREMENTS_RECORDED,
    TESTING_EXECUTIONS,
    TESTING_REQUESTS,
    topic_name,
)
from labbus.producers.pv import models  # noqa: E402
from tests.bench.gwfleet import Namespace, machine, pct  # noqa: E402
from tests.unit.test_testing_logic import PROTOCOLS  # noqa: E402

SPEED = "1000000"
DEVICES = "iv-curve-tracer:2,climate-chamber:2,insulation-tester:1"


def events(cfg, spec) -> list:
    codec = default_codec()

    async def read():
        return [r async for r in kafka.read_to_end(cfg, topic_name(cfg, spec))]

    out = []
    for r in asyncio.run(read()):
        try:
            out.append(codec.decode(r.value))
        except ValueError:
            continue
    return out


def wait(predicate, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2, help="modules per request")
    args = ap.parse_args()
    ns = Namespace.create("bench-testing", 0)
    db = "labbus_" + ns.name.replace("-", "_")
    ns.env.update(LABBUS_MONGO_DB=db, LABBUS_TESTING_SPEED=SPEED)
    from labbus.events import config

    ns.cfg = config.load(ns.env)
    asyncio.run(kafka.ensure_topics(ns.cfg))
    procs: list[subprocess.Popen] = []
    try:
        prefix = f"pv{uuid.uuid4().hex[:4]}"
        procs += [ns.start("process", "devices"), ns.start("process", "testing"),
                  ns.start("process", "reports"),
                  ns.start("agent", "pv", "--devices", DEVICES, "--prefix", prefix)]
        wait(lambda: len({e.device_id for e in events(ns.cfg, DEVICE_STATUS)
                          if isinstance(e, DeviceStatusChanged) and e.status == "ONLINE"}) == 5,
             90, "the PV instruments ONLINE")
        rids = [f"SR-B{i:03d}-{uuid.uuid4().hex[:4]}" for i in range(args.requests)]
        load0 = os.getloadavg()
        t0 = time.time()

        async def submit():
            for i, rid in enumerate(rids):
                samples = [f"B{i:03d}S{j}" for j in range(args.samples)]
                registered = [register_sample(
                    s, f"LIMS-{s}", "ACME Solar", models.DEFAULT_MODULE, 1.62, f"SN-{s}",
                    datetime.now(UTC), "bench") for s in samples]
                await kafka.publish(ns.cfg, *registered, ServiceRequestSubmitted.create(
                    source="bench", subject=rid, sequence=1, request_id=rid,
                    customer="ACME Solar", module_type=models.DEFAULT_MODULE,
                    module_area_m2=1.62, sample_ids=samples, protocols=PROTOCOLS,
                    submitted_by="bench"))

        asyncio.run(submit())

        def reports() -> list:
            return [e for e in events(ns.cfg, TESTING_REQUESTS)
                    if isinstance(e, ReportGenerated) and e.format == "pdf"]

        wait(lambda: len({e.request_id for e in reports()}) == len(rids),
             120 + 30 * len(rids), "a PDF report of every request", every=1.0)
        load1 = os.getloadavg()
        requests = events(ns.cfg, TESTING_REQUESTS)
        done = {e.request_id: e for e in requests if isinstance(e, ServiceRequestCompleted)}
        pdfs: dict[str, ReportGenerated] = {}
        for e in requests:
            if isinstance(e, ReportGenerated) and e.format == "pdf":
                pdfs.setdefault(e.request_id, e)
        ends = {e.execution_id: e for e in events(ns.cfg, TESTING_EXECUTIONS)
                if isinstance(e, (ExecutionPassed, ExecutionFailed))}
        last_reading: dict[str, float] = {}
        for m in events(ns.cfg, MEASUREMENTS_RECORDED):
            if isinstance(m, MeasurementRecorded) and m.envelope.correlation_id is not None:
                eid = str(m.envelope.correlation_id)
                at = m.envelope.recorded_at.timestamp()
                last_reading[eid] = max(last_reading.get(eid, 0.0), at)
        verdict_ms = [(e.envelope.recorded_at.timestamp() - last_reading[x]) * 1000
                      for x, e in ends.items() if x in last_reading]
        report_ms = [(pdfs[r].envelope.recorded_at - done[r].envelope.recorded_at)
                     .total_seconds() * 1000 for r in rids]
        last_done = max(e.envelope.recorded_at.timestamp() for e in done.values())
        last_pdf = max(e.envelope.recorded_at.timestamp() for e in pdfs.values())
        n_ex = len(ends)
        print(f"{machine()}; load {load0[0]:.2f} -> {load1[0]:.2f}")
        print(f"{len(rids)} requests x {args.samples} modules x {len(PROTOCOLS)} protocols = "
              f"{n_ex} executions; wall to the last completion {last_done - t0:.1f} s "
              f"({n_ex / (last_done - t0):.2f} executions/s), to the last PDF "
              f"{last_pdf - t0:.1f} s")
        print(f"last reading -> verdict: p50 {pct(verdict_ms, 0.5):.0f} ms, p99 "
              f"{pct(verdict_ms, 0.99):.0f} ms (n={len(verdict_ms)})")
        print(f"completion -> ReportGenerated(pdf): p50 {pct(report_ms, 0.5):.0f} ms, p99 "
              f"{pct(report_ms, 0.99):.0f} ms, max {max(report_ms):.0f} ms (n={len(report_ms)})")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        asyncio.run(ns.drop())
        from pymongo import MongoClient

        MongoClient(ns.cfg.mongo_url).drop_database(db)


if __name__ == "__main__":
    main()
