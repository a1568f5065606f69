"""Test-protocol benchmark (issue 11): N service requests x 3 protocols through the whole
pipeline, from the request to its PDF downloadable from the query API.

    .venv/bin/python tests/bench/bench_testing.py [--requests 100] [--samples 2] \
        [--renderers 1,0]

Per run, in a fresh namespace, a PostgreSQL database and a Mongo database of its own (the
reports in GridFS), each labbus process as a user starts it: `process devices`, `process
testing`, `agent pv` (2 I-V tracers, 2 climate chambers, 1 insulation tester), `process reports`
(LABBUS_REPORT_RENDERERS = the run's value), `project postgres` and `api` (trusting a stand-in
token issuer, tests/support/idp.py: a viewer's token). All requests (PVTP-001, PVTP-015 TC200,
PVTP-003 on `--samples` modules each) are submitted at once; LABBUS_TESTING_SPEED 1e6 (TC200's
~570 h take ~2 s of simulated-instrument time) and LABBUS_TESTING_MIN_TIMEOUT_S 600
(`--min-step-timeout`): every step is dispatched at once and an instrument runs its commands in
turn, so ~100 TC200 runs queue on each climate chamber; with the default 30 s, steps at the back
of those queues time out (there is no instrument scheduling, README "Known limits").
A follower thread reads lab.testing.requests and lab.testing.executions as they grow; once a
request's ReportGenerated(pdf) is out, the bench asks the API for its report.pdf every 0.25 s
until it gets the bytes announced (sha256).

Printed per run (times are the events' recorded_at and this machine's clock: one clock):
- wall time from the first submission to the last completion and to the last PDF downloadable,
  executions/s;
- an execution's last reading (MeasurementRecorded correlated to it) -> its verdict
  (ExecutionPassed/Failed) p50/p99;
- a request's completion -> its ReportGenerated(pdf), and -> its PDF downloadable through the
  API, p50/p99;
- PDF generation (render time in the renderer, from `process reports`' "rendered the reports"
  log lines) p50/p99, and how long reports waited for a renderer.
`--renderers 1,0` makes two runs (1 renderer process; 0 = rendering in the worker's event loop,
as before) and prints the ratio of their figures. The load average (/proc/loadavg) before and
after each run: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
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
from tests.conftest import free_port  # noqa: E402
from tests.support.idp import Tokens  # noqa: E402
from tests.unit.test_testing_logic import PROTOCOLS  # noqa: E402

SPEED = "1000000"
DEVICES = "iv-curve-tracer:2,climate-chamber:2,insulation-tester:1"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" tasks")[0].strip()


def events(cfg, spec) -> list:
    """Every decodable event of a topic now (from the beginning)."""
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


class Follower(threading.Thread):
    """Follows lab.testing.requests and lab.testing.executions from their beginning (a consumer
    without group in its own event loop): the ends of executions, the completions and the
    ReportGenerated(pdf) of the run's requests, as they arrive."""

    def __init__(self, cfg) -> None:
        super().__init__(daemon=True)
        self.cfg = cfg
        self.lock = threading.Lock()
        self.ends: dict[str, ExecutionPassed | ExecutionFailed] = {}
        self.done: dict[str, ServiceRequestCompleted] = {}
        self.pdfs: dict[str, ReportGenerated] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._follow())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    async def _follow(self) -> None:
        codec = default_codec()
        consumer = kafka.consumer(self.cfg, topic_name(self.cfg, TESTING_REQUESTS),
                                  topic_name(self.cfg, TESTING_EXECUTIONS), group=None)
        await consumer.start()
        try:
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                for records in batch.values():
                    for r in records:
                        try:
                            e = codec.decode(r.value)
                        except ValueError:
                            continue
                        with self.lock:
                            if isinstance(e, (ExecutionPassed, ExecutionFailed)):
                                self.ends.setdefault(e.execution_id, e)
                            elif isinstance(e, ServiceRequestCompleted):
                                self.done.setdefault(e.request_id, e)
                            elif isinstance(e, ReportGenerated) and e.format == "pdf":
                                self.pdfs.setdefault(e.request_id, e)
        finally:
            await consumer.stop()


def progress(n_ex: int, total_ex: int, done: int, downloadable: int, total: int,
             elapsed: float) -> None:
    width = 30
    filled = round(width * downloadable / total) if total else width
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] executions {n_ex}/{total_ex}, completed {done}/{total}, "
                     f"PDF downloadable {downloadable}/{total}, {elapsed:.0f} s ")
    sys.stderr.flush()


def render_log(path: Path) -> list[dict]:
    """The "rendered the reports" lines of `process reports`' JSON log."""
    out = []
    for line in path.read_text().splitlines():
        if "rendered the reports of" not in line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_once(requests: int, samples: int, renderers: int, timeout_s: float,
             min_step_timeout: str) -> dict:
    ns = Namespace.create("bench-testing", 0, database=True)
    mongo_db = "labbus_" + ns.name.replace("-", "_")
    tokens = Tokens()
    ns.env.update(LABBUS_MONGO_DB=mongo_db, LABBUS_TESTING_SPEED=SPEED,
                  LABBUS_TESTING_MIN_TIMEOUT_S=min_step_timeout, **tokens.env)
    ns.cfg = config.load(ns.env)
    asyncio.run(kafka.ensure_topics(ns.cfg))
    procs: list[subprocess.Popen] = []
    follower = Follower(ns.cfg)
    try:
        prefix = f"pv{uuid.uuid4().hex[:4]}"
        reports_log = ns.pki_dir / "process-reports.log"
        procs += [ns.start("process", "devices"), ns.start("process", "testing"),
                  ns.start("agent", "pv", "--devices", DEVICES, "--prefix", prefix),
                  ns.start("project", "postgres")]
        env, ns.env = ns.env, {**ns.env, "LABBUS_LOG_LEVEL": "INFO",
                               "LABBUS_REPORT_RENDERERS": str(renderers)}
        procs.append(ns.start("process", "reports"))
        ns.env = env
        port = free_port()
        with open(ns.pki_dir / "api.log", "w") as log:
            procs.append(subprocess.Popen([LABBUS, "api", "--port", str(port)], env=ns.env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                           headers=tokens.headers("bench-viewer", ("viewer",)))

        def api_up() -> bool:
            try:
                return api.get("/health/live").status_code == 200
            except httpx.HTTPError:
                return False

        wait(api_up, 60, "the query API")
        wait(lambda: len({e.device_id for e in events(ns.cfg, DEVICE_STATUS)
                          if isinstance(e, DeviceStatusChanged) and e.status == "ONLINE"}) == 5,
             90, "the PV instruments ONLINE")
        follower.start()
        rids = [f"SR-B{i:03d}-{uuid.uuid4().hex[:4]}" for i in range(requests)]
        total_ex = requests * samples * len(PROTOCOLS)
        load0 = loadavg()
        t0 = time.time()

        async def submit():
            for i, rid in enumerate(rids):
                ids = [f"B{i:03d}S{j}" for j in range(samples)]
                registered = [register_sample(
                    s, f"LIMS-{s}", "ACME Solar", models.DEFAULT_MODULE, 1.62, f"SN-{s}",
                    datetime.now(UTC), "bench") for s in ids]
                await kafka.publish(ns.cfg, *registered, ServiceRequestSubmitted.create(
                    source="bench", subject=rid, sequence=1, request_id=rid,
                    customer="ACME Solar", module_type=models.DEFAULT_MODULE,
                    module_area_m2=1.62, sample_ids=ids, protocols=PROTOCOLS,
                    submitted_by="bench"))

        asyncio.run(submit())
        downloaded: dict[str, float] = {}
        last_shown = None
        deadline = time.monotonic() + timeout_s
        while len(downloaded) < len(rids):
            if follower.error is not None:
                raise follower.error
            if time.monotonic() > deadline:
                raise SystemExit(f"\ntimed out: {len(downloaded)} of {len(rids)} PDFs "
                                 f"downloadable after {timeout_s:.0f} s")
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise SystemExit(f"\na process ended: {dead} (logs in {ns.pki_dir})")
            with follower.lock:
                pdfs = dict(follower.pdfs)
                n_ex, n_done = len(follower.ends), len(follower.done)
            for rid, e in pdfs.items():
                if rid in downloaded:
                    continue
                r = api.get(f"/service-requests/{rid}/report.pdf")
                if r.status_code == 200:
                    at = time.time()
                    if hashlib.sha256(r.content).hexdigest() != e.sha256:
                        continue  # a newer generation projected first: wait for this one
                    downloaded[rid] = at
                elif r.status_code != 404:
                    raise SystemExit(f"\nGET report.pdf of {rid}: {r.status_code} {r.text}")
            shown = (n_ex, n_done, len(downloaded), int(time.time() - t0) // 5)
            if shown != last_shown:  # on a change, and every 5 s
                progress(n_ex, total_ex, n_done, len(downloaded), len(rids), time.time() - t0)
                last_shown = shown
            time.sleep(0.25)
        sys.stderr.write("\n")
        load1 = loadavg()
        follower.stopping.set()
        follower.join(10)
        with follower.lock:
            ends, done, pdfs = dict(follower.ends), dict(follower.done), dict(follower.pdfs)
        t = time.perf_counter()
        last_reading: dict[str, float] = {}
        for m in events(ns.cfg, MEASUREMENTS_RECORDED):
            if isinstance(m, MeasurementRecorded) and m.envelope.correlation_id is not None:
                eid = str(m.envelope.correlation_id)
                at = m.envelope.recorded_at.timestamp()
                last_reading[eid] = max(last_reading.get(eid, 0.0), at)
        read_s = time.perf_counter() - t
        verdict_ms = [(e.envelope.recorded_at.timestamp() - last_reading[x]) * 1000
                      for x, e in ends.items() if x in last_reading]
        done_at = {r: done[r].envelope.recorded_at.timestamp() for r in rids}
        report_ms = [(pdfs[r].envelope.recorded_at.timestamp() - done_at[r]) * 1000
                     for r in rids]
        download_ms = [(downloaded[r] - done_at[r]) * 1000 for r in rids]
        rendered = [x for x in render_log(reports_log) if x.get("request_id") in done]
        pdf_ms = [x["render_ms"]["pdf"] for x in rendered]
        queued_ms = [x["queued_ms"] for x in rendered]
        last_done = max(done_at.values()) - t0
        return {"renderers": renderers, "machine": machine(), "load": (load0, load1),
                "requests": len(rids), "samples": samples, "min_step_s": min_step_timeout,
                "executions": len(ends),
                "wall_done_s": last_done, "wall_pdf_s": max(downloaded.values()) - t0,
                "executions_per_s": len(ends) / last_done,
                "verdict_ms": verdict_ms, "report_ms": report_ms, "download_ms": download_ms,
                "pdf_ms": pdf_ms, "queued_ms": queued_ms, "readings_read_s": read_s,
                "failed": collections.Counter(
                    f"{e.protocol_id} {e.reason_code}" + (
                        "" if e.reason_code != "timeout" else " (readings)"
                        if "no its readings" in e.reason else " (completion)")
                    for e in ends.values() if isinstance(e, ExecutionFailed))}
    finally:
        follower.stopping.set()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        tokens.close()
        asyncio.run(ns.drop())
        from pymongo import MongoClient

        MongoClient(ns.cfg.mongo_url).drop_database(mongo_db)


def p50_99(values: list[float], unit: str = "ms") -> str:
    if not values:
        return "n=0"
    return (f"p50 {pct(values, 0.5):.0f} {unit}, p99 {pct(values, 0.99):.0f} {unit}, "
            f"max {max(values):.0f} {unit} (n={len(values)})")


def report(r: dict) -> None:
    where = ("in the worker's event loop" if r["renderers"] == 0
             else f"{r['renderers']} renderer process(es)")
    print(f"\n== {r['requests']} requests x {r['samples']} modules x {len(PROTOCOLS)} protocols, "
          f"reports rendered {where}")
    print(f"LABBUS_TESTING_MIN_TIMEOUT_S={r['min_step_s']}; {r['machine']}; /proc/loadavg "
          f"{r['load'][0]} -> {r['load'][1]}")
    failed = ", ".join(f"{n} {why}" for why, n in sorted(r["failed"].items())) or "none"
    print(f"{r['executions']} executions (failed: {failed}); wall to the last completion "
          f"{r['wall_done_s']:.1f} s ({r['executions_per_s']:.2f} executions/s), to the last "
          f"PDF downloadable {r['wall_pdf_s']:.1f} s")
    print(f"last reading -> verdict:                 {p50_99(r['verdict_ms'])}")
    print(f"completion -> ReportGenerated(pdf):      {p50_99(r['report_ms'])}")
    print(f"completion -> PDF downloadable (API):    {p50_99(r['download_ms'])}")
    print(f"PDF generation (render):                 {p50_99(r['pdf_ms'])}")
    print(f"report waiting for a renderer:           {p50_99(r['queued_ms'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2, help="modules per request")
    ap.add_argument("--renderers", default="1",
                    help="LABBUS_REPORT_RENDERERS of each run, comma-separated (e.g. 1,0); "
                         "each run's ratios to the last one's are printed")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    ap.add_argument("--min-step-timeout", default="600",
                    help="LABBUS_TESTING_MIN_TIMEOUT_S: all requests are dispatched at once and "
                         "an instrument runs its commands in turn (~100 TC200 runs queue on "
                         "each climate chamber), longer than the default 30 s allows")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.renderers.split(",")):
        results.append(run_once(args.requests, args.samples, n, args.timeout,
                                args.min_step_timeout))
        report(results[-1])
    base = results[-1]
    for first in results[:-1]:
        print(f"\nratio (renderers {first['renderers']} / {base['renderers']}):")
        for key, what in (("report_ms", "completion -> ReportGenerated(pdf) p50"),
                          ("download_ms", "completion -> PDF downloadable p50"),
                          ("verdict_ms", "last reading -> verdict p50")):
            print(f"  {what}: {pct(first[key], 0.5) / pct(base[key], 0.5):.2f}")
        print(f"  executions/s: {first['executions_per_s'] / base['executions_per_s']:.2f}")
        print(f"  wall to the last PDF downloadable: "
              f"{first['wall_pdf_s'] / base['wall_pdf_s']:.2f}")


if __name__ == "__main__":
    main()
