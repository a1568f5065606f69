"""The report processor (`labbus process reports`): when a service request completes, its PDF,
workbook and CSV (processors/reports) built from the request's events, stored in the artifact
store (LABBUS_ARTIFACTS) and announced with one ReportGenerated per format.

**Inputs** (co-partitioned, 6 partitions each): lab.testing.requests (request id: the request,
its inspections, its completion and the ReportGenerated read back), lab.testing.executions
(execution id: only forwarded) and lab.reports.inbox, this processor's repartition topic: the
records of lab.testing.executions a report shows (ProtocolAssigned, ExecutionStarted,
ExecutionAnalysed, QcEvaluated, ExecutionPassed/Failed, NonConformanceRaised), the same bytes,
keyed by their request id, as processors/quota.py re-keys by user. So one Table entry per
request collects what its report needs as the events arrive; no topic is read again per
request. The readings come with ExecutionAnalysed (v2: the testing processor puts the step
readings it judged, and which device ran each step when, into it).

**When.** ServiceRequestCompleted arrives on one topic, the executions' events through the
inbox, one hop later: the report is made once the completion is here *and* every execution it
counts has its assignment and its end, plus its NonConformanceRaised when its criteria say one
follows (`testing_logic.raises_nc`); whichever input completes that set triggers it.

**Same events, same report.** Everything in the report comes from the events (the first of
each kind per execution counts, so a processor that handled an input twice changes nothing);
the report's date is the completion's `occurred_at`. The same state gives the same bytes, so
the same sha256, the same stored artifact (content-addressed) and the same ReportGenerated id
(`report_event_id`: request, format, sha256). A kill -9 mid-generation leaves the request
`pending` (or its completion uncommitted): the restarted worker generates again from the same
state; at most the events are produced twice with the same ids, never a second report.

**After.** Once generated the request's state shrinks to the sha256 of its reports (later
inputs of that request change nothing). A store that is down (Mongo unreachable, a full disk)
leaves the request `pending`: the timer tries again every few seconds, and the
ReportGenerated read back end it. A report that cannot be made from the events (an unknown
template version, an inconsistent input) dead-letters the input that triggered it, with the
reason.

**Rendering off the event loop.** The handler only decides that a request's reports are due
(its state becomes `pending`; it builds the report's input once, so a report that cannot be made
dead-letters the input as before) and returns at once; a timer (`Generate`, every 0.2 s) hands
the due reports to `Renderers`: LABBUS_REPORT_RENDERERS spawned processes (default 1) that
render the three formats and `put` them in the store, while the worker's event loop goes on
consuming, heartbeating, committing and collecting the next requests. A finished render's
ReportGenerated are produced by the timer; read back, they shrink the state to `generated`.
Processes, not threads: rendering is CPU-bound Python (one GIL), and ReportLab and matplotlib
keep module-level state that is not documented as thread-safe. Each process renders one report
at a time, the same code on the same input: the same bytes as in the worker itself. A process
leaves when its worker dies (kill -9 too); a killed worker's pending requests are rendered again
by the next owner, with the same ids. LABBUS_REPORT_RENDERERS=0 renders in the event loop (as
before; the benchmark's baseline). Start more workers and they share the requests.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from labbus.events import faust_runtime
from labbus.events.artifacts import Artifact, ArtifactStore, open_store
from labbus.events.config import Config
from labbus.events.model import (
    Event,
    ExecutionAnalysed,
    ExecutionFailed,
    ExecutionPassed,
    ExecutionStarted,
    InspectionRecorded,
    NonConformanceRaised,
    ProtocolAssigned,
    QcEvaluated,
    ReportGenerated,
    ServiceRequestCompleted,
    ServiceRequestRejected,
    ServiceRequestSubmitted,
    report_event_id,
)
from labbus.events.protocols import Catalog, shipped_catalog
from labbus.events.runtime import Outgoing, Record, transient
from labbus.events.topics import (
    REPORTS_INBOX,
    TESTING_EXECUTIONS,
    TESTING_REQUESTS,
    topic_name,
)
from labbus.processors.qc.criteria import CriterionResult
from labbus.processors.qc.evaluation import Evaluation
from labbus.processors.reports import (
    CONTENT_TYPES,
    ExecutionReport,
    NonConformance,
    Sample,
    ServiceRequestReport,
    execution_from_evaluation,
    render_criteria_csv,
    render_pdf,
    render_xlsx,
)
from labbus.processors.reports.model import sections_of, standard_of
from labbus.processors.testing_logic import raises_nc

PROCESS = "reports"
SOURCE = "reports"
INPUTS = (TESTING_REQUESTS, TESTING_EXECUTIONS, REPORTS_INBOX)
FORMATS = ("pdf", "xlsx", "csv")
RENDER = {"pdf": render_pdf, "xlsx": render_xlsx, "csv": render_criteria_csv}
EXECUTION_EVENTS = (ProtocolAssigned, ExecutionStarted, ExecutionAnalysed, QcEvaluated,
                    ExecutionPassed, ExecutionFailed, NonConformanceRaised)
log = logging.getLogger(__name__)
ACCEPTS = {cls.TYPE for cls in (*EXECUTION_EVENTS, ServiceRequestSubmitted,
                                ServiceRequestRejected, InspectionRecorded,
                                ServiceRequestCompleted, ReportGenerated)}


@dataclass(frozen=True)
class Settings:
    """The templates, the topics' names (namespace included) and the artifact store (opened on
    first use); `opener` opens another one, in a renderer process (picklable)."""

    catalog: Catalog
    executions: str
    inbox: str
    store: Callable[[], ArtifactStore]
    opener: Callable[[], ArtifactStore] | None = None


def handle(state: dict | None, event: Event, record: Record, settings: Settings
           ) -> tuple[dict | None, list]:
    """One input record -> (new state, outputs); the state is the request's (key = request
    id), except for records of lab.testing.executions, which are only forwarded."""
    if record.topic == settings.executions:
        if isinstance(event, EXECUTION_EVENTS):
            return state, [Outgoing(settings.inbox, event.request_id.encode(), record.value)]
        return state, []
    st = state or {}
    if st.get("generated"):
        return state, []  # its reports exist: nothing about this request changes any more
    if isinstance(event, ServiceRequestRejected):
        return None, []  # no executions, no report
    if isinstance(event, ReportGenerated):
        return _read_back(st, event)
    new = remember(st, event, record)
    if new is st or not new.get("done") or new.get("pending") or not ready(new):
        return (state if new is st else new), []
    report_of(new, settings.catalog)  # one that cannot be made: the runtime dead-letters the
    return {**new, "pending": True}, []  # input with the reason; due: `Generate` renders it


def _read_back(st: dict, event: ReportGenerated) -> tuple[dict | None, list]:
    """A pending request's report made by the timer: the state shrinks once all are back."""
    if not st.get("pending"):
        return st or None, []
    back = {**st.get("back", {}), event.format: event.sha256}
    if set(back) >= set(FORMATS):
        return generated(st, back), []
    return {**st, "back": back}, []


def generated(st: dict, shas: Mapping[str, str]) -> dict:
    return {"p": st.get("p"), "id": st.get("id"), "generated": dict(shas)}


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def remember(st: dict, event: Event, record: Record) -> dict:
    """The state with what the report needs of this event (the first of its kind counts; a
    repeat returns `st` itself)."""
    at = _iso(event.envelope.occurred_at)
    if isinstance(event, ServiceRequestSubmitted):
        if "req" in st:
            return st
        req = {"customer": event.customer, "module_type": event.module_type,
               "area": float(event.module_area_m2), "samples": list(event.sample_ids),
               "protocols": [str(p.get("protocol_id", "")) for p in event.protocols],
               "by": event.submitted_by, "at": at}
        return {**st, "p": record.partition, "id": event.request_id, "req": req}
    if isinstance(event, InspectionRecorded):
        key = str(event.event_id)
        if key in st.get("insp", {}):
            return st
        findings = [*event.findings, *(f"defect: {d}" for d in event.defects)]
        return {**st, "p": record.partition, "id": event.request_id,
                "insp": {**st.get("insp", {}), key: [event.sample_id, findings]}}
    if isinstance(event, ServiceRequestCompleted):
        if "done" in st:
            return st
        corr = event.envelope.correlation_id
        done = {"at": at, "event_id": str(event.event_id), "executions": event.executions,
                "corr": None if corr is None else str(corr)}
        return {**st, "p": record.partition, "id": event.request_id, "done": done}
    if not isinstance(event, EXECUTION_EVENTS):
        return st
    ex = st.get("ex", {})
    x = ex.get(event.execution_id, {})
    if isinstance(event, NonConformanceRaised):
        if event.nc_id in x.get("nc", {}):
            return st
        part = {"nc": {**x.get("nc", {}), event.nc_id: {
            "criteria": list(event.criteria), "description": event.description, "at": at}}}
    else:
        slot, value = _slot(event, at)
        if slot in x:
            return st
        part = {slot: value}
    return {**st, "p": record.partition, "id": event.request_id,
            "ex": {**ex, event.execution_id: {**x, **part}}}


def _slot(event: Event, at: str) -> tuple[str, Any]:
    if isinstance(event, ProtocolAssigned):
        return "a", {"sample": event.sample_id, "protocol": event.protocol_id,
                     "version": event.template_version, "sha256": event.template_sha256,
                     "inputs": dict(event.inputs)}
    if isinstance(event, ExecutionStarted):
        actor = event.envelope.actor
        return "s", {"at": at, "operator": actor.user_id if actor else event.envelope.source}
    if isinstance(event, ExecutionAnalysed):
        return "an", {"results": dict(event.results), "units": dict(event.units),
                      "readings": event.readings, "steps": list(event.steps)}
    if isinstance(event, QcEvaluated):
        return "qc", {"criteria": list(event.criteria), "verdict": event.verdict}
    if isinstance(event, ExecutionPassed):
        return "end", {"verdict": "pass", "at": at, "reason": ""}
    assert isinstance(event, ExecutionFailed)
    return "end", {"verdict": "fail", "at": at, "reason": event.reason,
                   "code": event.reason_code}


def _expects_nc(x: dict) -> bool:
    return (x["end"]["verdict"] == "fail" and "qc" in x
            and any(raises_nc(c["verdict"], c.get("value")) for c in x["qc"]["criteria"]))


def ready(st: dict) -> bool:
    """Completed, and every execution it counts assigned and ended (with its non-conformance
    when one follows)."""
    done, ex = st.get("done"), st.get("ex", {})
    if done is None or "req" not in st or len(ex) < done["executions"]:
        return False
    return all("a" in x and "end" in x and (x.get("nc") or not _expects_nc(x))
               for x in ex.values())


# -- the report -----------------------------------------------------------------------------------

def report_of(st: dict, catalog: Catalog) -> ServiceRequestReport:
    """The ServiceRequestReport of a ready request's state. Pure."""
    req = st["req"]
    findings: dict[str, list[str]] = {}
    for sample, found in st.get("insp", {}).values():
        findings.setdefault(sample, []).extend(found)
    samples = tuple(Sample(s, findings=tuple(findings.get(s, ()))) for s in req["samples"])
    order = {(s, p): i for i, (s, p) in enumerate(
        (s, p) for s in req["samples"] for p in req["protocols"])}
    ex = sorted(st["ex"].items(), key=lambda kv: (
        order.get((kv[1]["a"]["sample"], kv[1]["a"]["protocol"]), len(order)), kv[0]))
    executions = tuple(execution_of(eid, x, catalog) for eid, x in ex)
    ncs = tuple(NonConformance(
        id=nc_id, execution_id=eid, sample_id=x["a"]["sample"], protocol_id=x["a"]["protocol"],
        reason=nc["description"], raised_at=_time(nc["at"]), criteria=tuple(nc["criteria"]))
        for eid, x in ex for nc_id, nc in sorted(x.get("nc", {}).items()))
    return ServiceRequestReport(
        request_id=st["id"], customer=req["customer"], module_type=req["module_type"],
        module_area_m2=req["area"], samples=samples, executions=executions,
        generated_at=_time(st["done"]["at"]), non_conformances=ncs,
        submitted_at=_time(req["at"]),
        requested_protocols=tuple(dict.fromkeys(p for p in req["protocols"] if p)))


def execution_of(eid: str, x: dict, catalog: Catalog) -> ExecutionReport:
    a, end = x["a"], x["end"]
    template = catalog.get(a["protocol"], a["version"])
    started = _time(x["s"]["at"]) if "s" in x else None
    operator = x["s"]["operator"] if "s" in x else ""
    finished = _time(end["at"])
    if "qc" not in x:  # ended before its analysis (timeout, a failed command, bad input)
        return ExecutionReport(
            execution_id=eid, sample_id=a["sample"], protocol_id=template.id,
            protocol_title=template.title, template_version=template.version,
            template_sha256=template.sha256, standard=standard_of(template),
            verdict="fail", criteria=(), inputs=dict(a["inputs"]),
            input_units={i.name: i.unit for i in template.inputs}, operator=operator,
            started_at=started, finished_at=finished, failure_reason=end["reason"],
            sections=tuple(s for s in sections_of(template) if not s.steps))
    an = x.get("an", {})
    criteria = tuple(CriterionResult(
        id=c["id"], description=c["description"], clause=c["clause"], operator=c["operator"],
        unit=c["unit"], value=c.get("value"), limit=_limit(c.get("limit") or []),
        verdict=c["verdict"], message=c["message"]) for c in x["qc"]["criteria"])
    evaluation = Evaluation(
        template_id=template.id, template_version=template.version,
        template_sha256=template.sha256, inputs=dict(a["inputs"]),
        results=an.get("results", {}), units=an.get("units", {}), criteria=criteria,
        verdict=x["qc"]["verdict"], reasons=())
    steps = an.get("steps", [])
    return execution_from_evaluation(
        template, evaluation, execution_id=eid, sample_id=a["sample"],
        readings=an.get("readings", {}), operator=operator, started_at=started,
        finished_at=finished, instruments={s["step_id"]: s["device_id"] for s in steps},
        step_times={s["step_id"]: (_ms(s["started_ms"]), _ms(s["finished_ms"]))
                    for s in steps},
        failure_reason=end["reason"])


def _limit(limit: list) -> float | tuple[float, float] | None:
    if not limit:
        return None
    return float(limit[0]) if len(limit) == 1 else (float(limit[0]), float(limit[1]))


def _ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def file_name(request_id: str, fmt: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", request_id).strip("._") or "request"
    return f"{safe}-{'criteria' if fmt == 'csv' else 'report'}.{fmt}"


@dataclass(frozen=True)
class Rendered:
    """A request's three reports, stored: the artifacts, the seconds each format took to render
    and when (time.time()) rendering started and ended (in the process that rendered)."""

    artifacts: Mapping[str, Artifact]
    seconds: Mapping[str, float]
    started: float
    ended: float


def render_and_store(report: ServiceRequestReport, store: ArtifactStore) -> Rendered:
    """Render the three formats of `report` and put each in `store`. Pure but for the store."""
    started = time.time()
    artifacts, seconds = {}, {}
    for fmt in FORMATS:
        t = time.perf_counter()
        data = RENDER[fmt](report)
        seconds[fmt] = time.perf_counter() - t
        artifacts[fmt] = store.put(file_name(report.request_id, fmt), CONTENT_TYPES[fmt], data)
    return Rendered(artifacts, seconds, started, time.time())


def announced(st: dict, certificate: bool, artifacts: Mapping[str, Artifact]
              ) -> list[ReportGenerated]:
    """The ReportGenerated of each stored format (ids from request, format and sha256)."""
    done, rid = st["done"], st["id"]
    return [ReportGenerated.create(
        source=SOURCE, subject=rid, sequence=i,
        event_id=uuid.UUID(report_event_id(rid, fmt, artifacts[fmt].sha256)),
        correlation_id=uuid.UUID(done["corr"]) if done.get("corr") else None,
        causation_id=uuid.UUID(done["event_id"]), request_id=rid, format=fmt,
        name=file_name(rid, fmt), content_type=CONTENT_TYPES[fmt],
        sha256=artifacts[fmt].sha256, size=artifacts[fmt].size,
        location=artifacts[fmt].location, certificate=fmt == "pdf" and certificate)
        for i, fmt in enumerate(FORMATS, 1)]


# -- where reports are rendered -------------------------------------------------------------------

_CHILD: dict[str, Any] = {}


def _child_start(opener: Callable[[], ArtifactStore], parent: int) -> None:
    """A renderer process: the renderers' heavy imports, the store opened once, and a thread
    that ends the process when its worker is gone (a kill -9 leaves no orphan rendering)."""
    warm_up()
    _CHILD["store"] = opener()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_render(report: ServiceRequestReport) -> Rendered:
    return render_and_store(report, _CHILD["store"])


class Renderers:
    """Where reports are rendered: `processes` spawned processes (each renders one report at a
    time, in the order submitted), or with 0 right here, in the caller's thread (the worker's
    event loop: it waits). `submit` returns a Future of `Rendered`."""

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes and settings.opener is None:
            raise ValueError("rendering in processes needs Settings.opener (picklable)")
        self.settings, self.processes = settings, processes
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_start, initargs=(self.settings.opener, os.getpid()))
        return self.pool

    def start(self) -> None:
        """Start the processes now (their imports take seconds), not on the first request."""
        if self.processes:
            for f in [self._pool().submit(time.sleep, 0) for _ in range(self.processes)]:
                f.result()

    def submit(self, report: ServiceRequestReport) -> Future:
        if self.processes:
            return self._pool().submit(_child_render, report)
        future: Future = Future()
        try:
            future.set_result(render_and_store(report, self.settings.store()))
        except Exception as exc:  # noqa: BLE001 - handed to the caller with the future
            future.set_exception(exc)
        return future

    def broken(self) -> None:
        """A process died (killed, out of memory): new ones for the next submissions."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


class Generate:
    """The timer that has pending requests' reports rendered (`Renderers`) and produces their
    ReportGenerated once rendered: a request is submitted once while it renders, tried again
    after `every_s` when it failed with a transient error (the store down, a renderer killed),
    and not again for `remember_s` after its events were produced (until the ReportGenerated
    read back end the request's pending state). A render that fails otherwise (a bug: the input
    was checked by the handler) is logged and tried again after `give_up_s`."""

    def __init__(self, settings: Settings, renderers: Renderers | None = None,
                 every_s: float = 5.0, remember_s: float = 30.0, give_up_s: float = 600.0):
        self.settings = settings
        self.renderers = renderers or Renderers(settings, 0)
        self.every_ms, self.remember_ms = every_s * 1000, remember_s * 1000
        self.give_up_ms = give_up_s * 1000
        self.next_try: dict[str, float] = {}
        self.running: dict[str, tuple[dict, bool, float, Future]] = {}
        self.__name__ = "reports-generate"

    def __call__(self, states: Mapping[str, dict], now_ms: int,
                 behind: Mapping[int, int] | None = None) -> list[Event]:
        started = time.monotonic()
        self.next_try = {k: t for k, t in self.next_try.items() if t > now_ms}
        for key, st in states.items():
            if not st.get("pending") or key in self.next_try or key in self.running:
                continue
            log.info("generating the reports of %s", st["id"], extra={"request_id": st["id"]})
            report = report_of(st, self.settings.catalog)
            self.running[key] = (st, report.all_passed, time.time(),
                                 self.renderers.submit(report))
        # remembered from when the events go out: rendering here (no processes) takes this tick
        # seconds per request, and a request remembered from the tick's start was rendered again
        # by the next tick when its ReportGenerated had not been read back yet
        sent_ms = now_ms + round((time.monotonic() - started) * 1000)
        out: list[Event] = []
        for key in [k for k, r in self.running.items() if r[3].done()]:
            st, certificate, submitted, future = self.running.pop(key)
            try:
                rendered: Rendered = future.result()
            except Exception as exc:  # noqa: BLE001 - decided below
                self._failed(key, st, exc, now_ms)
                continue
            log.info("rendered the reports of %s", st["id"], extra={
                "request_id": st["id"],
                "render_ms": {f: round(s * 1000, 1) for f, s in rendered.seconds.items()},
                "queued_ms": round((rendered.started - submitted) * 1000, 1),
                "total_ms": round((time.time() - submitted) * 1000, 1)})
            self.next_try[key] = sent_ms + self.remember_ms
            out.extend(announced(st, certificate, rendered.artifacts))
        return out

    def _failed(self, key: str, st: dict, exc: Exception, now_ms: int) -> None:
        if isinstance(exc, BrokenExecutor):
            self.renderers.broken()
        if isinstance(exc, BrokenExecutor) or transient(exc):
            log.warning("the reports of %s failed; trying again", st["id"],
                        extra={"request_id": st["id"], "error": repr(exc)})
            self.next_try[key] = now_ms + self.every_ms
            return
        log.error("the reports of %s cannot be rendered", st["id"], exc_info=exc,
                  extra={"request_id": st["id"]})
        self.next_try[key] = now_ms + self.give_up_ms


# -- the process ----------------------------------------------------------------------------------

def settings(cfg: Config, store: Callable[[], ArtifactStore] | None = None) -> Settings:
    opener = functools.partial(open_store, cfg)
    return Settings(catalog=shipped_catalog(), executions=topic_name(cfg, TESTING_EXECUTIONS),
                    inbox=topic_name(cfg, REPORTS_INBOX),
                    store=store or functools.cache(opener), opener=opener)


def _handle(state: Any, event: Any, record: Any, _shared: Any, *, s: Settings):
    return handle(state, event, record, s)


def build_app(cfg: Config, *, tick_s: float = 0.2, renderers: int | None = None,
              **overrides: Any):
    s = settings(cfg)
    pool = Renderers(s, cfg.report_renderers if renderers is None else renderers)
    pool.start()
    if not pool.processes:
        warm_up()
    app = faust_runtime.build_app(cfg, PROCESS, INPUTS, functools.partial(_handle, s=s),
                                  accepts=ACCEPTS, table="reports",
                                  timers=[(tick_s, Generate(s, pool))], **overrides)
    app.labbus_renderers = pool
    return app


def warm_up() -> float:
    """Import the renderers' heavy parts (ReportLab, matplotlib, openpyxl) before the first
    request waits for them; returns the seconds it took."""
    started = time.perf_counter()
    import matplotlib.pyplot  # noqa: F401
    import openpyxl  # noqa: F401
    import reportlab.platypus  # noqa: F401

    return time.perf_counter() - started


def run(cfg: Config) -> None:
    """Run the report worker until SIGINT/SIGTERM; start more and they share the requests."""
    faust_runtime.run(build_app(cfg), cfg)
