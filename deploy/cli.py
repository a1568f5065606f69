"""The `labbus` command: one subcommand per process, plus local services and tools."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from labbus.events import config as config_mod
from labbus.events import logs, metrics


def _cfg() -> config_mod.Config:
    try:
        return config_mod.load()
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _start_process(name: str, cfg: config_mod.Config, metrics_port: int | None = None) -> None:
    import uvloop

    uvloop.install()  # every labbus process: ~15% less CPU per event than asyncio's own loop
    logs.configure(name, cfg.log_level)
    port = metrics_port if metrics_port is not None else cfg.metrics_port
    if port >= 0:
        try:
            bound = metrics.serve(name, port)
            click.echo(f"{name}: metrics on http://127.0.0.1:{bound}/metrics", err=True)
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve metrics on port {port or metrics.DEFAULT_PORTS.get(name)}: {exc}; "
                "set LABBUS_METRICS_PORT or --metrics-port") from None


def _run_until_signal(coro_factory) -> None:
    """Run an async main with a stop event set by SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    try:
        asyncio.run(main())
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


metrics_option = click.option("--metrics-port", type=int, default=None,
                              help="Port for /metrics (default: LABBUS_METRICS_PORT or the "
                                   "process's own default; -1 disables).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """labbus: an event-sourced message bus for laboratory automation."""


# -- services -------------------------------------------------------------------------------
@main.group()
def services() -> None:
    """Local Kafka, PostgreSQL and Mongo-compatible servers (no Docker needed)."""


@services.command("up")
def services_up() -> None:
    """Install (once) and start the local servers; wait until each answers."""
    from labbus.deploy.local import services as svc

    try:
        addresses = svc.up(_cfg(), echo=lambda m: click.echo(m, err=True))
    except svc.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    for name, addr in addresses.items():
        click.echo(f"{name:9} {addr}")


@services.command("down")
def services_down() -> None:
    """Stop the local servers (data is kept under LABBUS_HOME)."""
    from labbus.deploy.local import services as svc

    svc.down(_cfg(), echo=lambda m: click.echo(m, err=True))


@services.command("status")
def services_status() -> None:
    """Show whether each local server runs, where, and its pid."""
    from labbus.deploy.local import services as svc

    for s in svc.status(_cfg()):
        state = "running" if s.running else "stopped"
        click.echo(f"{s.name:9} {state:8} {s.address or '-':40} "
                   f"pid={s.pid or '-'} {s.detail or ''}")


# -- configuration and catalog -------------------------------------------------------------------
@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (for the README).")
def show_config(markdown: bool) -> None:
    """Show every environment variable, its default and its current value."""
    cfg = _cfg()
    for name, s in config_mod.SETTINGS.items():
        if markdown:
            default = s.default
            click.echo(f"| `{s.env}` | `{default}` | {s.help} |")
        else:
            click.echo(f"{s.env:26} = {getattr(cfg, name)}")


@main.group()
def topics() -> None:
    """The topic catalog."""


@topics.command("list")
def topics_list() -> None:
    """Print the catalog: name, partitions, key, retention, event types."""
    from labbus.events.topics import CATALOG, topic_name

    cfg = _cfg()
    for spec in CATALOG:
        keep = ("compacted" if spec.compacted else "forever" if spec.retention_ms == -1
                else f"{(spec.retention_ms or 0) // 86_400_000} d")
        click.echo(f"{topic_name(cfg, spec):32} p={spec.partitions} key={spec.key:13} "
                   f"{keep:10} {', '.join(spec.event_types)}")


@topics.command("create")
def topics_create() -> None:
    """Create missing topics of the catalog (idempotent)."""
    from labbus.events.kafka import ensure_topics

    created = asyncio.run(ensure_topics(_cfg()))
    click.echo("created: " + (", ".join(created) if created else "nothing, all exist"))


# -- processes ------------------------------------------------------------------------------------
@main.group()
def agent() -> None:
    """Instrument agents that publish events."""


@agent.command("sim")
@click.option("--devices", default=10, show_default=True, help="Number of simulated devices.")
@click.option("--rate", default=10.0, show_default=True,
              help="Readings per second over the fleet (0 = as fast as possible).")
@click.option("--count", default=0, show_default=True, help="Readings to send (0 = until stopped).")
@click.option("--bad-fraction", default=0.0, show_default=True,
              help="Share of bad readings: wrong unit, out of range, future timestamp, "
                   "duplicate event id, undecodable bytes (in turn).")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@metrics_option
def agent_sim(devices: int, rate: float, count: int, bad_fraction: float, seed: int,
              metrics_port: int | None) -> None:
    """A simulated instrument fleet publishing DeviceRegistered and MeasurementRecorded."""
    from labbus.producers import sim

    cfg = _cfg()
    _start_process("agent", cfg, metrics_port)
    try:
        simulator = sim.FleetSimulator(sim.make_fleet(devices, seed), seed, bad_fraction)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bad-fraction") from None

    async def go(stop: asyncio.Event) -> None:
        if count:
            with click.progressbar(length=count, label="publishing", file=sys.stderr) as bar:
                done = [0]

                def progress(n: int) -> None:
                    bar.update(n - done[0])
                    done[0] = n

                summary = await sim.publish(cfg, simulator, count, rate, progress, stop)
        else:
            summary = await sim.publish(cfg, simulator, 0, rate, None, stop)
        click.echo(f"registered {summary.registered} devices, sent {summary.readings} readings "
                   f"({summary.good} good, bad: {dict(summary.bad) or 'none'})")

    _run_until_signal(go)


@agent.command("ot2")
@click.option("--simulate", is_flag=True,
              help="Run protocols on opentrons' Protocol Engine, in-process.")
@click.option("--robot", "robot_url", default=None, metavar="HOST[:PORT]",
              help="Run protocols on a real OT-2 through its HTTP API (port 31950 by default).")
@metrics_option
def agent_ot2(simulate: bool, robot_url: str | None, metrics_port: int | None) -> None:
    """An OT-2 agent: runs each RobotRunRequested, publishes its commands and dispensed wells."""
    if simulate == bool(robot_url):
        raise click.UsageError("give exactly one of --simulate or --robot HOST")
    _run_process("agent-ot2", metrics_port, robot_url=robot_url)


@agent.command("reader")
@click.option("--seed", default=0, show_default=True, help="Seed of the simulated camera noise.")
@click.option("--delay", default=0.0, show_default=True, help="Seconds each reading takes.")
@metrics_option
def agent_reader(seed: int, delay: float, metrics_port: int | None) -> None:
    """A simulated plate reader: a WellColourMeasured for each WellDispensed."""
    _run_process("agent-reader", metrics_port, seed=seed, delay_s=delay)


@main.group()
def process() -> None:
    """Stream processors (faust-streaming apps)."""


@process.command("validate")
@metrics_option
def process_validate(metrics_port: int | None) -> None:
    """Validate raw readings: emit MeasurementValidated / MeasurementRejected, dead-letter junk."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("validator", cfg, metrics_port)
    PROCESSES["validator"].run(cfg)


@process.command("experiment")
@metrics_option
def process_experiment(metrics_port: int | None) -> None:
    """Run colour-mixing campaigns: propose recipes, request robot runs, score readings.
    Start more than one: they share the partitions."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("experiment", cfg, metrics_port)
    PROCESSES["experiment"].run(cfg)


# -- experiments ----------------------------------------------------------------------------------
@main.group()
def experiment() -> None:
    """Closed-loop colour-mixing experiments on the OT-2."""


@experiment.command("start")
@click.option("--target", required=True,
              help="Target colour: '#7a3cc0', 'rgb(122, 60, 192)' or 'lab(50, 20, -30)'.")
@click.option("--budget", default=96, show_default=True, help="Most wells to use (1-96).")
@click.option("--batch", default=8, show_default=True, help="Wells per robot run.")
@click.option("--dyes", default="red,yellow,blue", show_default=True,
              help="Comma-separated dye stocks.")
@click.option("--tolerance", default=2.0, show_default=True, help="Success below this ΔE00.")
@click.option("--id", "experiment_id", default=None, help="Experiment id (default: generated).")
def experiment_start(target: str, budget: int, batch: int, dyes: str, tolerance: float,
                     experiment_id: str | None) -> None:
    """Request an experiment; prints its id (follow it with `labbus experiment watch ID`)."""
    from labbus.deploy import experiment as exp
    from labbus.processors.colour.scoring import TargetError

    try:
        req = exp.request(target, budget, batch, [d.strip() for d in dyes.split(",") if d.strip()],
                          tolerance, experiment_id)
    except TargetError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    asyncio.run(exp.publish(_cfg(), req))
    click.echo(req.experiment_id)


@experiment.command("watch")
@click.argument("experiment_id")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0 = never).")
def experiment_watch(experiment_id: str, timeout: float) -> None:
    """Follow an experiment: wells used, best ΔE00, until it completes, fails or is rejected."""
    from labbus.deploy import experiment as exp
    from labbus.events.model import ExperimentCompleted, ExperimentRequested, WellScored

    state = {"bar": None, "best": None, "budget": 96, "label": ""}

    def on_event(event) -> None:
        if isinstance(event, ExperimentRequested):
            state["budget"] = event.budget_wells
            return
        if isinstance(event, WellScored):
            if state["bar"] is None:
                state["bar"] = click.progressbar(length=state["budget"], label="wells used",
                                                 file=sys.stderr, show_pos=True,
                                                 item_show_func=lambda _: state["label"])
                state["bar"].__enter__()
            if state["best"] is None or event.delta_e < state["best"]:
                state["best"] = event.delta_e
            state["label"] = f"best ΔE00 {state['best']:.2f}"
            state["bar"].update(1)
            return
        line = None if isinstance(event, exp.FINAL) else exp.describe(event)
        if line:
            click.echo(("\n" if state["bar"] else "") + line, err=True)

    final = asyncio.run(exp.watch(_cfg(), experiment_id, on_event, timeout))
    if state["bar"]:
        state["bar"].__exit__(None, None, None)
    if final is None:
        raise click.ClickException(f"no verdict for {experiment_id} within {timeout:g} s")
    click.echo(exp.describe(final))
    if not isinstance(final, ExperimentCompleted):
        sys.exit(1)


@main.group()
def project() -> None:
    """Projectors that turn events into read models."""


batch_option = click.option("--batch", default=5000, show_default=True,
                            help="Most events written per transaction.")


def _run_process(name: str, metrics_port: int | None, **options) -> None:
    """Start a process as deploy/bootstrap.py wires it."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process(name, cfg, metrics_port)
    _run_until_signal(lambda stop: PROCESSES[name].run(cfg, stop, **options))


@project.command("postgres")
@metrics_option
@batch_option
def project_postgres(metrics_port: int | None, batch: int) -> None:
    """Project devices and validated measurements into PostgreSQL (exactly-once positions)."""
    _run_process("projector-postgres", metrics_port, batch=batch)


@project.command("mongo")
@metrics_option
@batch_option
def project_mongo(metrics_port: int | None, batch: int) -> None:
    """Project one document per device into MongoDB (idempotent upserts)."""
    _run_process("projector-mongo", metrics_port, batch=batch)


@main.command("api")
@click.option("--host", default=None, help="Bind address (default LABBUS_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default LABBUS_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the read-only query API (OpenAPI docs at /docs, metrics at /metrics)."""
    import uvicorn

    from labbus.api.app import create_app

    cfg = _cfg()
    logs.configure("api", cfg.log_level)
    uvicorn.run(create_app(cfg), host=host or cfg.api_host, port=port or cfg.api_port,
                log_config=None, access_log=False)


@main.command("demo")
@click.option("--devices", default=20, show_default=True)
@click.option("--rate", default=50.0, show_default=True, help="Readings per second.")
@click.option("--bad-fraction", default=0.05, show_default=True)
@click.option("--duration", default=0, show_default=True,
              help="Stop after this many seconds (0 = until Ctrl-C).")
def demo(devices: int, rate: float, bad_fraction: float, duration: int) -> None:
    """Services + validator + projectors + API + a simulated fleet; prints the URLs to open."""
    from labbus.deploy import demo as demo_mod

    demo_mod.run(_cfg(), devices=devices, rate=rate, bad_fraction=bad_fraction,
                 duration=duration, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
