"""The report processor's logic (processors/report_gen.py) on the events of a whole service
request: those the testing processor's logic and the simulated PV instruments produce in
tests/unit/test_testing_logic.py's in-memory log, delivered to the report handler in orders the
test chooses, with a real file store in a temporary directory. No Kafka, no Mongo."""

from __future__ import annotations

import collections
import functools
import io
import random
import time

import openpyxl
import pytest
from pypdf import PdfReader

from labbus.events.artifacts import FileStore
from labbus.events.codec import default_codec
from labbus.events.model import (
    ExecutionAnalysed,
    ReportGenerated,
    ServiceRequestCompleted,
    report_event_id,
)
from labbus.events.protocols import shipped_catalog
from labbus.events.runtime import Outgoing, Record
from labbus.processors import report_gen as rg
from labbus.processors.reports.xlsx import READINGS_HEADER
from tests.unit.test_testing_logic import DEVICES, PROTOCOLS, Bus, pick_samples, submit

CODEC = default_codec()
REQUESTS, EXECUTIONS, INBOX = "lab.testing.requests", "lab.testing.executions", "lab.reports.inbox"


@pytest.fixture(scope="module")
def workflow():
    """The records of one request (two modules x three protocols, one failing TC200) as the
    testing processor's logic published them: (topic, key, value) of its two topics."""
    bad, (good,) = pick_samples(1)
    bus = Bus(DEVICES)
    submit(bus, [good, bad], PROTOCOLS, rid="SR-RG")
    bus.run()
    records = [r for r in bus.log if r[0] in (REQUESTS, EXECUTIONS)]
    return bad, good, records


def settings(store) -> rg.Settings:
    return rg.Settings(catalog=shipped_catalog(), executions=EXECUTIONS, inbox=INBOX,
                       store=lambda: store)


class Reports:
    """The report handler over an in-memory log: its forwards go to the inbox queue, its
    ReportGenerated are kept and read back."""

    def __init__(self, s: rg.Settings) -> None:
        self.s = s
        self.states: dict[str, dict] = {}
        self.generated: list[ReportGenerated] = []
        self.n = 0

    def deliver(self, records) -> None:
        queue = collections.deque(records)
        while queue:
            topic, key, value = queue.popleft()
            self.n += 1
            event = CODEC.decode(value)
            if event.TYPE not in rg.ACCEPTS:
                continue
            k = key.decode()
            state, outs = rg.handle(self.states.get(k), event,
                                    Record(topic, 0, self.n, key, value, self.n), self.s)
            if state is None:
                self.states.pop(k, None)
            else:
                self.states[k] = state
            for o in outs:
                if isinstance(o, Outgoing):
                    queue.append((o.topic, o.key, o.value))
                else:
                    self.generated.append(o)
                    queue.append((REQUESTS, o.key, CODEC.encode(o)))  # read back

    def tick(self, timer: rg.Generate, now_ms: int) -> None:
        for e in timer(self.states, now_ms):
            self.generated.append(e)
            self.deliver([(REQUESTS, e.key, CODEC.encode(e))])

    def run(self, records, timer: rg.Generate | None = None, now_ms: int = 1_000
            ) -> rg.Generate:
        """Deliver the records, then tick the timer every 0.1 s from `now_ms` (rendering here,
        in this thread, unless it was given other renderers) until no request waits for its
        reports."""
        self.deliver(records)
        timer = timer or rg.Generate(self.s)
        for k in range(600):
            self.tick(timer, now_ms + 100 * k)
            if not timer.running and not any(st.get("pending") for st in self.states.values()):
                break
            time.sleep(0.1)
        return timer


def words(text: str) -> str:
    return " ".join(text.split())


def check_pdf(pdf: bytes, verdicts: dict[tuple[str, str], str]) -> None:
    """The PDF's text (pypdf) has each execution's part with its verdict."""
    text = words(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages))
    catalog = shipped_catalog()
    heads = {(s, p): text.index(f"{p} {catalog.get(p).title} \u2014 sample {s}")
             for s, p in verdicts}
    ordered = sorted(heads, key=heads.get)
    for i, key in enumerate(ordered):
        end = heads[ordered[i + 1]] if i + 1 < len(ordered) else len(text)
        part = text[heads[key]:end]
        assert f"Verdict {verdicts[key].upper()}" in part, (key, part[:400])


def check_workbook(xlsx: bytes, analysed: list[ExecutionAnalysed]) -> None:
    """The workbook opens with openpyxl; each execution's sheet holds its readings."""
    book = openpyxl.load_workbook(io.BytesIO(xlsx), read_only=True)
    assert book.sheetnames[0] == "Summary" and len(book.sheetnames) == 1 + len(analysed)
    for a in analysed:
        (name,) = [n for n in book.sheetnames if a.protocol_id in n and a.sample_id in n]
        rows = list(book[name].iter_rows(values_only=True))
        start = next(k for k, r in enumerate(rows) if r and r[0] == READINGS_HEADER)
        header = list(rows[start])
        for step, metrics in a.readings.items():
            for metric, values in metrics.items():
                col = next(i for i, h in enumerate(header)
                           if h and str(h).startswith(f"{step}.{metric}"))
                got = [r[col] for r in rows[start + 1:] if len(r) > col and r[col] is not None]
                assert got == pytest.approx(values), (name, step, metric)


def expected_verdicts(bad: str, good: str) -> dict[tuple[str, str], str]:
    return {(s, p["protocol_id"]): "pass" for s in (good, bad) for p in PROTOCOLS} | {
        (bad, "PVTP-015"): "fail"}


def test_the_analysis_carries_the_step_readings_and_who_measured_when(workflow):
    _, _, records = workflow
    analysed = [e for e in (CODEC.decode(v) for t, _, v in records if t == EXECUTIONS)
                if isinstance(e, ExecutionAnalysed)]
    assert len(analysed) == 6
    tc = next(a for a in analysed if a.protocol_id == "PVTP-015")
    assert len(tc.readings["stc_initial"]["voltage"]) == 100
    template = shipped_catalog().get("PVTP-015", tc.template_version)
    assert [s["step_id"] for s in tc.steps] == [s.id for s in template.steps]
    assert set(tc.readings) <= {s["step_id"] for s in tc.steps}
    for s in tc.steps:
        assert s["device_id"] in DEVICES and s["finished_ms"] >= s["started_ms"]


def test_a_completed_request_gets_three_reports_from_its_events(workflow, tmp_path):
    bad, good, records = workflow
    store = FileStore(tmp_path)
    r = Reports(settings(store))
    r.deliver(records)
    # the handler renders nothing: the request is due, the timer has its reports rendered
    assert r.generated == [] and r.states["SR-RG"]["pending"]
    r.run([])
    by_format = {e.format: e for e in r.generated}
    assert sorted(by_format) == ["csv", "pdf", "xlsx"] and len(r.generated) == 3
    for e in r.generated:
        assert e.request_id == "SR-RG" and e.envelope.subject == "SR-RG"
        assert str(e.event_id) == report_event_id("SR-RG", e.format, e.sha256)
        assert store.info(e.sha256).size == e.size and e.location.startswith("file://")
        assert e.certificate is False  # a module failed
    assert by_format["pdf"].content_type == "application/pdf"
    assert by_format["pdf"].name == "SR-RG-report.pdf"
    check_pdf(store.get(by_format["pdf"].sha256), expected_verdicts(bad, good))
    analysed = [e for e in (CODEC.decode(v) for t, _, v in records if t == EXECUTIONS)
                if isinstance(e, ExecutionAnalysed)]
    check_workbook(store.get(by_format["xlsx"].sha256), analysed)
    csv_text = store.get(by_format["csv"].sha256).decode()
    assert "pmax_degradation" in csv_text and bad in csv_text
    # the state shrank to the reports' addresses; later inputs change nothing
    assert r.states["SR-RG"] == {"p": 0, "id": "SR-RG", "generated": {
        f: by_format[f].sha256 for f in rg.FORMATS}}
    r.deliver(records)
    assert len(r.generated) == 3


def test_any_order_of_arrival_gives_the_same_bytes_and_the_same_event_ids(workflow, tmp_path):
    """The completion first, executions interleaved differently, every record twice: the
    report waits until every execution ended and is the same."""
    _, _, records = workflow
    first = Reports(settings(FileStore(tmp_path / "a")))
    first.run(records)
    requests = [r for r in records if r[0] == REQUESTS]
    by_execution: dict[bytes, list] = {}
    for r in records:
        if r[0] == EXECUTIONS:
            by_execution.setdefault(r[1], []).append(r)
    rnd = random.Random(7)
    streams = [list(v) for v in by_execution.values()]
    mixed = []
    while streams:  # a random interleaving that keeps each execution's own order
        s = rnd.choice(streams)
        rec = s.pop(0)
        mixed += [rec, rec]
        if not s:
            streams.remove(s)
    completed = [r for r in requests if CODEC.decode(r[2]).TYPE == ServiceRequestCompleted.TYPE]
    second = Reports(settings(FileStore(tmp_path / "b")))
    second.deliver([r for r in requests if r not in completed] + completed)
    assert second.generated == [] and "SR-RG" in second.states
    assert not second.states["SR-RG"].get("pending")
    second.run(mixed)
    assert {e.event_id for e in second.generated} == {e.event_id for e in first.generated}
    assert len(second.generated) == 3


def test_a_store_that_is_down_leaves_the_request_pending_and_the_timer_retries(
        workflow, tmp_path):
    """The store fails with an OSError (as an unreachable server does: a transient error):
    here a file store whose directory cannot be made until the file in its way is gone."""
    _, _, records = workflow
    blocker = tmp_path / "blocker"
    blocker.write_text("in the way")
    s = settings(FileStore(blocker / "store"))
    r = Reports(s)
    r.deliver(records)
    assert r.generated == [] and r.states["SR-RG"]["pending"]
    timer = rg.Generate(s)
    r.tick(timer, 1_000)
    assert r.generated == [] and r.states["SR-RG"]["pending"]
    blocker.unlink()
    r.tick(timer, 2_000)  # within the retry interval: not yet
    assert r.generated == []
    r.tick(timer, 7_000)
    assert sorted(e.format for e in r.generated) == ["csv", "pdf", "xlsx"]
    assert set(r.states["SR-RG"]) == {"p", "id", "generated"}
    r.tick(timer, 20_000)
    assert len(r.generated) == 3


def test_a_render_in_the_tick_is_remembered_from_when_its_events_go_out(workflow, tmp_path):
    """Rendering in the tick itself takes its seconds: the request is remembered from the
    tick's end, not rendered again by the next tick while its ReportGenerated is not read back
    yet (it was, in the 100-request benchmark: 20 reports rendered twice)."""
    _, _, records = workflow
    s = settings(FileStore(tmp_path))
    r = Reports(s)
    r.deliver(records)
    timer = rg.Generate(s, remember_s=0.5)
    t = time.monotonic()
    assert len(timer(r.states, 1_000)) == 3  # not read back
    took_ms = (time.monotonic() - t) * 1000
    assert took_ms > 100  # the render (the PDF alone takes longer)
    assert timer(r.states, 1_000 + 600) == []


def test_a_renderer_process_makes_the_same_reports_and_one_killed_midway_is_replaced(
        workflow, tmp_path):
    """Rendering in a spawned process: the timer's tick returns at once (the event loop goes
    on) and the reports come with a later tick, the same bytes and ids as rendered here; a
    renderer killed mid-render (BrokenProcessPool) is replaced and the request rendered again."""
    _, _, records = workflow
    here = Reports(settings(FileStore(tmp_path / "here")))
    here.run(records)
    store = FileStore(tmp_path / "there")
    s = rg.Settings(catalog=shipped_catalog(), executions=EXECUTIONS, inbox=INBOX,
                    store=lambda: store, opener=functools.partial(FileStore, tmp_path / "there"))
    renderers = rg.Renderers(s, 1)
    renderers.start()
    try:
        r = Reports(s)
        r.deliver(records)
        timer = rg.Generate(s, renderers, every_s=1.0)
        t = time.perf_counter()
        r.tick(timer, 1_000)
        assert time.perf_counter() - t < 0.5 and r.generated == [] and timer.running
        (child,) = renderers.pool._processes.values()
        child.kill()  # mid-render
        child.join(10)
        for k in range(100):  # the broken pool is seen and the request waits `every_s`
            r.tick(timer, 1_001 + k)
            if not timer.running:
                break
            time.sleep(0.1)
        assert r.generated == [] and "SR-RG" in timer.next_try
        r.run([], timer, now_ms=10_000)
        assert {e.event_id for e in r.generated} == {e.event_id for e in here.generated}
        assert len(r.generated) == 3
        for e in r.generated:
            assert store.get(e.sha256) == here.s.store().get(e.sha256)
    finally:
        renderers.close()


def test_file_names_are_safe():
    assert rg.file_name("SR-1", "pdf") == "SR-1-report.pdf"
    assert rg.file_name("../x y", "csv") == "x_y-criteria.csv"
