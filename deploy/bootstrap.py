"""One place wires every process: which topics it reads, its handler, its state and its sinks.

The CLI (`labbus agent|process|project ...`), `labbus demo` (which runs the CLI) and the tests
build processes only through `PROCESSES`. Adding a processor is a handler (a plain function or
small class, no Kafka in it) plus one entry here; the runtime (labbus.events.runtime) does the
consuming, dead-lettering, producing, committing, retrying and metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from labbus.events.config import Config
from labbus.events.runtime import run_consumer, run_view
from labbus.events.topics import ROBOT_RUNS

Stop = asyncio.Event


@dataclass(frozen=True)
class Process:
    name: str  # metrics, logs and consumer group
    what: str
    run: Callable[..., Coroutine[Any, Any, None] | None]  # (cfg, stop, **options)


async def plate_reader(cfg: Config, stop: Stop, seed: int = 0, delay_s: float = 0.0) -> None:
    from labbus.producers.colour_reader import PlateReader

    reader = PlateReader(seed, delay_s)
    await run_consumer(cfg, "agent-reader", [ROBOT_RUNS], reader, stop, accepts=reader.accepts,
                       max_records=50)


async def ot2(cfg: Config, stop: Stop, robot_url: str | None = None) -> None:
    """Simulation, or a real OT-2 when `robot_url` is given."""
    from labbus.producers import ot2_agent

    client = None
    agent = ot2_agent.Ot2Agent()
    if robot_url:
        from labbus.producers.ot2.robot_http import OT2Client

        client = OT2Client(robot_url)
        agent = ot2_agent.Ot2Agent(ot2_agent.on_robot(client), "robot")
    try:
        # one run per poll: a run takes seconds, and its offset is committed when it ends
        await run_consumer(cfg, "agent-ot2", [ROBOT_RUNS], agent, stop, accepts=agent.accepts,
                           max_records=1)
    finally:
        if client is not None:
            await client.aclose()


async def sila2(cfg: Config, stop: Stop, settings=None) -> None:
    """A SiLA 2 server as a device: readings, heartbeats, status, commands
    (labbus.producers.sila.bridge; its commands through run_consumer)."""
    from labbus.producers.sila import bridge

    await bridge.run(cfg, stop, settings)


async def postgres_view(cfg: Config, stop: Stop, batch: int = 5000) -> None:
    from labbus.projections.postgres import PostgresProjection

    await run_view(cfg, PostgresProjection(cfg), stop, batch)


async def mongo_view(cfg: Config, stop: Stop, batch: int = 5000) -> None:
    from labbus.projections.mongo import MongoProjection

    await run_view(cfg, MongoProjection(cfg), stop, batch)


def validator(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker: runs until SIGINT/SIGTERM (faust handles the signals)."""
    from labbus.processors import validator as app

    app.run(cfg)


def experiment(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (campaign state in Tables): runs until SIGINT/SIGTERM."""
    from labbus.processors import experiment as app

    app.run(cfg)


def quota(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (balances per user in a Table): runs until SIGINT/SIGTERM."""
    from labbus.processors import quota as app

    app.run(cfg)


def devices(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (state per device in a Table, timers): runs until SIGINT/SIGTERM."""
    from labbus.processors import lifecycle

    lifecycle.run(cfg)


def testing(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (requests and executions in a Table, a timer): runs until
    SIGINT/SIGTERM."""
    from labbus.processors import testing as app

    app.run(cfg)


def reports(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (what each request's report needs in a Table; the artifact store):
    runs until SIGINT/SIGTERM."""
    from labbus.processors import report_gen as app

    app.run(cfg)


async def pv_agent(cfg: Config, stop: Stop, **options: Any) -> None:
    """Simulated PV instruments (labbus.producers.pv.agents): register, heartbeat, answer
    their commands."""
    from labbus.producers.pv import agents

    await agents.run(cfg, stop, **options)


def anomalies(cfg: Config, stop: Stop | None = None) -> None:
    """A faust worker (rolling statistics in a Table): runs until SIGINT/SIGTERM."""
    from labbus.processors import anomaly as app

    app.run(cfg)


async def webhooks(cfg: Config, stop: Stop) -> None:
    """Outbound webhooks: a consumer group per target (labbus.webhooks.<name>), so a target that
    is down delays only its own deliveries; one event per poll, so its offset is committed as
    soon as its outcome (delivered or dead-lettered) is acknowledged."""
    from labbus.processors.webhooks import Forwarder, Stopped, targets_of

    forwarders = [Forwarder(t, stop) for t in targets_of(cfg)]

    async def deliver(f: Forwarder) -> None:
        try:
            await run_consumer(cfg, f.target.process, f.target.topics(), f, stop,
                               accepts=f.accepts, max_records=1)
        except Stopped:  # stopped during a backoff: that event is sent again at the next start
            pass

    try:
        async with asyncio.TaskGroup() as group:
            for f in forwarders:
                group.create_task(deliver(f))
    finally:
        for f in forwarders:
            await f.aclose()


PROCESSES: dict[str, Process] = {p.name: p for p in (
    Process("agent-reader", "simulated plate reader: WellDispensed -> WellColourMeasured",
            plate_reader),
    Process("agent-ot2", "OT-2 agent: RobotRunRequested -> the run's events", ot2),
    Process("agent-sila2", "SiLA 2 bridge: a SiLA server's properties -> readings, "
            "lab.commands -> SiLA command executions", sila2),
    Process("projector-postgres", "PostgreSQL read models", postgres_view),
    Process("projector-mongo", "MongoDB documents", mongo_view),
    Process("validator", "faust validator: MeasurementRecorded -> Validated/Rejected",
            validator),
    Process("experiment", "colour-mixing campaigns (each starts once its budget is reserved)",
            experiment),
    Process("quota", "wells per user: ExperimentRequested -> QuotaReserved or "
            "ExperimentRejected (quota_exceeded); campaign ends -> QuotaRefunded", quota),
    Process("devices", "device status (ONLINE/OFFLINE from heartbeats) and command lifecycle "
            "(rejections, timeouts, idempotency)", devices),
    Process("anomalies", "rolling statistics: MeasurementValidated -> AnomalyDetected",
            anomalies),
    Process("testing", "test protocols: ServiceRequestSubmitted -> executions (instrument "
            "commands, readings, QC verdicts, non-conformances) -> ServiceRequestCompleted",
            testing),
    Process("reports", "reports of completed service requests: ServiceRequestCompleted -> "
            "PDF, workbook and CSV in the artifact store, one ReportGenerated per format",
            reports),
    Process("agent-pv", "simulated PV instruments: I-V tracer, climate chamber, insulation "
            "and wet leakage testers answering their commands", pv_agent),
    Process("webhooks", "outbound webhooks: events -> signed HTTP POSTs to the targets of "
            "LABBUS_WEBHOOKS_CONFIG; every attempt an event on lab.webhooks", webhooks),
)}
