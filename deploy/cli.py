"""The `labbus` command: one subcommand per process, plus local services and tools."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import click

from labbus.events import config as config_mod
from labbus.events import logs, metrics
from labbus.events.identity import ROLES


def _cfg(environ: dict[str, str] | None = None) -> config_mod.Config:
    """The configuration (of `environ`, default the process's), acting as the Kafka principal
    of the running command's kind (events/access.py: `labbus agent ot2` is agent-ot2, `labbus
    command send` operator, ...); a command with none (the API, certificates, `db`) gets no
    Kafka access at all."""
    import dataclasses

    from labbus.events import access

    try:
        cfg = config_mod.load(environ)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    ctx = click.get_current_context(silent=True)
    command = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
    return dataclasses.replace(cfg, kafka_principal=access.principal_for_command(command) or "")


def _start_process(name: str, cfg: config_mod.Config, metrics_port: int | None = None) -> None:
    from labbus.events.kafka import install_event_loop

    install_event_loop()  # uvloop, TLS connections closed without a 30 s wait for the broker
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
            value = getattr(cfg, name)
            if name == "kafka_password" and value:
                value = "***"
            click.echo(f"{s.env:26} = {value}")


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


@main.group("kafka")
def kafka_group() -> None:
    """The bus's principals and ACLs (events/access.py)."""


@kafka_group.command("acls")
@click.option("--namespace", default=None,
              help="The namespace whose ACLs to show or create (default LABBUS_NAMESPACE).")
@click.option("--apply", is_flag=True,
              help="Create the missing ones, as the admin principal (`labbus services up` and "
                   "`labbus topics create` do it for their namespace).")
def kafka_acls(namespace: str | None, apply: bool) -> None:
    """Print the ACLs every principal gets (derived from one table), and create them."""
    import dataclasses

    from labbus.events import access
    from labbus.events.kafka import ensure_acls

    cfg = _cfg()
    if namespace is not None:
        cfg = dataclasses.replace(cfg, namespace=namespace)
    for binding in access.bindings(cfg):
        click.echo(binding.describe())
    if apply:
        try:
            created = asyncio.run(ensure_acls(cfg))
        except (ConnectionError, config_mod.ConfigError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created {created} missing ACLs", err=True)


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
@click.option("--grpc", "use_grpc", is_flag=True,
              help="Connect each device to the gRPC gateway (mutual TLS, a certificate per "
                   "device from the local CA) instead of writing to Kafka; --rate is then "
                   "readings per second per device.")
@click.option("--target", default=None, metavar="HOST:PORT",
              help="--grpc: the gateway (default LABBUS_GATEWAY_HOST:LABBUS_GATEWAY_PORT).")
@click.option("--insecure", is_flag=True, help="--grpc: plain text (a loopback gateway only).")
@click.option("--duration", default=0.0, help="--grpc: stop after this many seconds (0 = never).")
@metrics_option
def agent_sim(devices: int, rate: float, count: int, bad_fraction: float, seed: int,
              use_grpc: bool, target: str | None, insecure: bool, duration: float,
              metrics_port: int | None) -> None:
    """A simulated instrument fleet publishing DeviceRegistered and MeasurementRecorded."""
    from labbus.producers import sim

    if use_grpc:
        if bad_fraction:
            raise click.UsageError("--bad-fraction is not supported with --grpc")
        _grpc_sim(devices, rate, count, seed, target, insecure, duration, metrics_port)
        return
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


def _grpc_sim(devices: int, rate: float, count: int, seed: int, target: str | None,
              insecure: bool, duration: float, metrics_port: int | None) -> None:
    from labbus.events import pki
    from labbus.producers.gateway import devices as dev

    cfg = _cfg()
    _start_process("agent", cfg, metrics_port)
    stats = dev.Stats()
    fleet = dev.make_fleet(devices, rate, stats, seed=seed)

    async def go(stop: asyncio.Event) -> None:
        async def watch() -> None:
            started = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(1.0)
                if count and stats.readings >= count:
                    for d in fleet:
                        d.paused = True
                    if stats.unacked(fleet) == 0:
                        stop.set()
                if duration and time.monotonic() - started >= duration:
                    stop.set()

        watcher = asyncio.create_task(watch())
        try:
            await dev.run_fleet(cfg, fleet, stop, target, insecure)
        except pki.PkiError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            watcher.cancel()
        click.echo(f"{devices} devices: sent {stats.readings} readings "
                   f"({stats.acked} messages acknowledged, {stats.resent} re-sent, "
                   f"{stats.reconnects} reconnects, {stats.commands_completed} commands "
                   f"completed, errors: {dict(stats.errors) or 'none'})")

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


@agent.command("pv")
@click.option("--devices", default="iv-curve-tracer:1,climate-chamber:1,insulation-tester:1,"
              "wet-leakage-tester:1", show_default=True,
              help="Device types and how many of each, TYPE:N,...")
@click.option("--prefix", default="pv", show_default=True,
              help="Device ids are PREFIX-TYPE-N.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the samples' properties and the readings' noise.")
@click.option("--heartbeat", default=2.0, show_default=True,
              help="Seconds between DeviceHeartbeats.")
@metrics_option
def agent_pv(devices: str, prefix: str, seed: int, heartbeat: float,
             metrics_port: int | None) -> None:
    """Simulated PV test instruments (pvlib physics): I-V curve tracers, climate chambers,
    insulation and wet leakage testers; each registers, heartbeats and answers its commands
    with readings. Time runs LABBUS_TESTING_SPEED times faster."""
    from labbus.producers.pv.agents import parse_devices

    try:
        parse_devices(devices, prefix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from None
    _run_process("agent-pv", metrics_port, devices=devices, prefix=prefix, seed=seed,
                 heartbeat_s=heartbeat)


@agent.command("reader")
@click.option("--seed", default=0, show_default=True, help="Seed of the simulated camera noise.")
@click.option("--delay", default=0.0, show_default=True, help="Seconds each reading takes.")
@metrics_option
def agent_reader(seed: int, delay: float, metrics_port: int | None) -> None:
    """A simulated plate reader: a WellColourMeasured for each WellDispensed."""
    _run_process("agent-reader", metrics_port, seed=seed, delay_s=delay)


@agent.command("sila2")
@click.option("--server", required=True, metavar="HOST:PORT", help="The SiLA 2 server.")
@click.option("--device-id", required=True, help="The labbus device id this server is.")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM of the CA (or certificate) the server's certificate chains to "
                   "(default: the labbus CA, LABBUS_PKI_DIR/ca.pem).")
@click.option("--insecure", is_flag=True,
              help="Plain text, no TLS: refused unless the server's address is loopback.")
@click.option("--heartbeat", default=1.0, show_default=True,
              help="Seconds between DeviceHeartbeats while the server answers.")
@click.option("--expected-interval", default=1.0, show_default=True,
              help="Seconds between readings stated in the measurement specs.")
@click.option("--device-type", default=None,
              help="Device type to register (default: the server's SiLA ServerType).")
@click.option("--location", default="", help="Location to register.")
@metrics_option
def agent_sila2(server: str, device_id: str, ca: Path | None, insecure: bool, heartbeat: float,
                expected_interval: float, device_type: str | None, location: str,
                metrics_port: int | None) -> None:
    """Bridge a SiLA 2 server: its observable properties become readings, lab.commands for
    DEVICE_ID become SiLA command executions."""
    from labbus.producers.sila import bridge

    cfg = _cfg()
    try:
        host, port = bridge.parse_server(server)
        settings = bridge.Settings(
            device_id=device_id, host=host, port=port, insecure=insecure,
            ca=None if insecure else (ca or cfg.pki_dir / "ca.pem"), heartbeat_s=heartbeat,
            expected_interval_s=expected_interval, device_type=device_type, location=location)
        settings.check()
    except bridge.BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    _run_process("agent-sila2", metrics_port, settings=settings)


@agent.command("sila2-sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", type=int, default=50052, show_default=True, help="Port.")
@click.option("--name", default="thermostat-sim", show_default=True,
              help="SiLA server name (its UUID and certificate derive from it).")
@click.option("--insecure", is_flag=True, help="Plain text: only on a loopback address.")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Server certificate PEM (default: one issued now from the labbus CA).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Its private key PEM.")
@click.option("--ramp-rate", default=5.0, show_default=True, help="Kelvin per second.")
@click.option("--interval", default=0.5, show_default=True,
              help="Seconds between observable property updates.")
def agent_sila2_sim(host: str, port: int, name: str, insecure: bool, cert: Path | None,
                    key: Path | None, ramp_rate: float, interval: float) -> None:
    """A simulated SiLA 2 thermostat (a real SiLA 2 server, sila2 package)."""
    import logging
    import signal as signal_mod
    import threading

    from labbus.events import pki
    from labbus.producers.sila import thermostat

    cfg = _cfg()
    # sila2's server logs every property update at INFO (under its own logger names): those
    # from WARNING up, labbus's own at LABBUS_LOG_LEVEL
    logs.configure("agent-sila2-sim", "WARNING" if cfg.log_level == "INFO" else cfg.log_level)
    logging.getLogger("labbus").setLevel(cfg.log_level)
    server, _impl = thermostat.make_server(name, ramp_rate=ramp_rate, interval_s=interval)
    try:
        thermostat.start(server, host, port, insecure=insecure, pki_dir=cfg.pki_dir, cert=cert,
                         key=key, name=name)
    except (ValueError, pki.PkiError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"SiLA 2 thermostat {name!r} on {host}:{port} "
               f"({'plain text' if insecure else 'TLS'})", err=True)
    done = threading.Event()
    for sig in (signal_mod.SIGINT, signal_mod.SIGTERM):
        signal_mod.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop(grace_period=1)


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


@process.command("quota")
@metrics_option
def process_quota(metrics_port: int | None) -> None:
    """Quotas of wells per user: reserve a campaign's budget before it starts (QuotaReserved, or
    ExperimentRejected with reason quota_exceeded), give the unused wells back when it ends
    (QuotaRefunded). Campaigns start only once reserved: run it beside `process experiment`.
    Start more than one: they share the users."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("quota", cfg, metrics_port)
    PROCESSES["quota"].run(cfg)


@process.command("devices")
@metrics_option
def process_devices(metrics_port: int | None) -> None:
    """Device status and command lifecycle: OFFLINE when heartbeats stop
    (LABBUS_OFFLINE_AFTER_INTERVALS × the device's interval), ONLINE when they resume;
    CommandRejected (unknown or offline device, payload against the command's JSON Schema,
    idempotency key reused) and CommandTimedOut. Start more: they share the devices."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("devices", cfg, metrics_port)
    PROCESSES["devices"].run(cfg)


@process.command("testing")
@metrics_option
def process_testing(metrics_port: int | None) -> None:
    """Test protocols: each ServiceRequestSubmitted becomes one execution per sample x protocol;
    each execution issues its steps' instrument commands, collects their readings, judges the
    template's criteria (ExecutionPassed / ExecutionFailed, NonConformanceRaised) and the request
    completes when all ended. Start more: they share the executions."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("testing", cfg, metrics_port)
    PROCESSES["testing"].run(cfg)


@process.command("reports")
@metrics_option
def process_reports(metrics_port: int | None) -> None:
    """Reports of service requests: when one completes, its PDF (with a certificate page when
    every protocol passed), workbook and CSV, built from its events, stored in the artifact store
    (LABBUS_ARTIFACTS) and announced with one ReportGenerated per format. Start more: they share
    the requests."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("reports", cfg, metrics_port)
    PROCESSES["reports"].run(cfg)


# -- commands ---------------------------------------------------------------------------------
# -- the CLI's identity at the command gateway ------------------------------------------------
@main.command("login")
@click.argument("email", required=False)
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input (else a prompt).")
@click.option("--token-stdin", is_flag=True,
              help="Store a token got elsewhere (a lab's own identity provider) read from "
                   "standard input, instead of logging in with a password.")
def login_cmd(email: str | None, password_stdin: bool, token_stdin: bool) -> None:
    """Get a token from the issuer (OAuth2 password flow) and keep it in LABBUS_TOKEN_FILE;
    `experiment start` and `command send` then go through the command gateway with it."""
    from labbus.deploy import login as lg

    cfg = _cfg()
    try:
        if token_stdin:
            token = lg.store(cfg, sys.stdin.readline().strip())
        else:
            if not email:
                raise click.UsageError("EMAIL is needed (or --token-stdin)")
            password = (sys.stdin.readline().rstrip("\r\n") if password_stdin
                        else click.prompt("Password", hide_input=True))
            token = lg.login(cfg, email, password)
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    left = max(0, int(token.expires_at - time.time()))
    click.echo(f"logged in as {token.subject} at {token.gateway_url}; the token is valid for "
               f"{left // 60} min {left % 60} s ({cfg.token_file})")


@main.command("logout")
def logout_cmd() -> None:
    """Forget the stored token."""
    from labbus.deploy import login as lg

    cfg = _cfg()
    click.echo("logged out" if lg.logout(cfg) else f"no token stored at {cfg.token_file}")


def _route(via: str, cfg):
    """The stored token when the command goes through the gateway, None when straight to Kafka
    (`--via auto`: the gateway when logged in)."""
    from labbus.deploy import login as lg

    try:
        token = lg.stored(cfg) if via in ("auto", "gateway") else None
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    if via == "gateway" and token is None:
        raise click.ClickException(f"no token for {cfg.gateway_url}: run `labbus login` first")
    if token is not None and token.expired:
        raise click.ClickException("the stored token has expired: run `labbus login` again "
                                   "(or `--via kafka` with broker credentials)")
    return token


VIA = click.option("--via", type=click.Choice(["auto", "gateway", "kafka"]), default="auto",
                   show_default=True,
                   help="gateway: through `labbus gateway http` with the token of `labbus "
                        "login`; kafka: straight to the broker (an operator with broker "
                        "credentials); auto: the gateway when logged in.")


@main.group()
def command() -> None:
    """Commands to devices (lab.commands)."""


def _duration(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    raw = value.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if raw.endswith(unit):
            raw, scale = raw[: -len(unit)], units[unit]
            break
    else:
        scale = 1
    try:
        seconds = float(raw) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected e.g. 30s, 2m, 500ms") from None
    if not 0 < seconds <= 86400:
        raise click.BadParameter(f"{value!r}: must be within (0, 24h]")
    return seconds


@command.command("send")
@click.argument("device")
@click.argument("command_type")
@click.option("--payload", default="{}", show_default=True, help="The command's JSON object.")
@click.option("--timeout", "timeout", default="30s", show_default=True,
              help="expires_at = now + this (30s, 2m, 500ms).")
@click.option("--idempotency-key", default=None,
              help="Same key for the same device = the same command, executed once "
                   "(default: a new uuid).")
@click.option("--wait", is_flag=True,
              help="Follow the command to its final state; exit 1 unless it completed.")
@VIA
def command_send(device: str, command_type: str, payload: str, timeout: str,
                 idempotency_key: str | None, wait: bool, via: str) -> None:
    """Send a command to DEVICE (a CommandIssued): through the command gateway when logged in,
    else straight to Kafka; prints the command id."""
    import json

    from labbus.deploy import commands as cmds

    seconds = _duration(timeout)
    try:
        parsed = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--payload")
    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        issued = asyncio.run(cmds.send(cfg, device, command_type, parsed, seconds,
                                       idempotency_key))
    else:
        import uuid

        from labbus.deploy import login as lg

        key = idempotency_key or str(uuid.uuid4())
        try:
            answer = lg.post(cfg, token, "/commands", {
                "device_id": device, "command_type": command_type, "payload": parsed,
                "timeout_s": seconds}, key)
        except lg.LoginError as exc:
            raise click.ClickException(str(exc)) from None
        # the command as the gateway made it (its id derives from the caller and the key)
        issued = cmds.issued_event(device, command_type, parsed, seconds,
                                   f"{token.subject}/{key}", token.subject)
        assert issued.command_id == answer["command_id"], answer
    click.echo(issued.command_id)
    if not wait:
        return
    import contextlib

    label = f"{command_type} on {device}"
    display = cmds.Display()
    # a terminal gets a bar (issued, dispatched, accepted, started and how far, final), anything
    # else a line for each step and each progress report
    bar = click.progressbar(length=display.position_end, label=label, file=sys.stderr,
                            item_show_func=lambda s: s, show_percent=False,
                            show_eta=False) if sys.stderr.isatty() else None

    def on_event(event) -> None:
        line = display.see(event)
        if line is None:
            return
        if bar is None:
            click.echo(f"{label}: {line}", err=True)
            return
        bar.current_item = line
        if display.position > bar.pos:
            bar.update(display.position - bar.pos)
        else:  # a progress report that changes only the text
            bar.render_progress()

    with bar or contextlib.nullcontext():
        final = asyncio.run(cmds.follow(cfg, issued, on_event, seconds + 10))
    if final is None:
        raise click.ClickException(f"no final state for {issued.command_id} within "
                                   f"{seconds + 10:g} s (is `labbus process devices` running?)")
    click.echo(cmds.describe(final))
    if not cmds.succeeded(final):
        sys.exit(1)


@process.command("anomalies")
@metrics_option
def process_anomalies(metrics_port: int | None) -> None:
    """Flag anomalous readings: rolling statistics per device and metric (a faust Table) turn
    outliers into AnomalyDetected on lab.alerts (flagged, not dropped). Thresholds:
    LABBUS_ANOMALY_THRESHOLD, LABBUS_ANOMALY_WARMUP, LABBUS_ANOMALY_ALPHA. Start more than one:
    they share the partitions."""
    from labbus.deploy.bootstrap import PROCESSES

    cfg = _cfg()
    _start_process("anomalies", cfg, metrics_port)
    PROCESSES["anomalies"].run(cfg)


@main.command("webhooks")
@metrics_option
@click.option("--check", is_flag=True,
              help="Read LABBUS_WEBHOOKS_CONFIG, print each target and exit (no Kafka).")
@click.option("--new-secret", is_flag=True,
              help="Print a new signing secret (whsec_...) for a target and exit.")
def webhooks(metrics_port: int | None, check: bool, new_secret: bool) -> None:
    """Outbound webhooks: POST the events of the configured types as signed JSON (Standard
    Webhooks: webhook-id, webhook-timestamp, webhook-signature) to each target of
    LABBUS_WEBHOOKS_CONFIG; retries with exponential backoff and jitter, a WebhookDeadLettered
    after the target's max_attempts; every attempt a WebhookDeliveryAttempted on lab.webhooks.
    At least once: receivers drop repeats by the webhook-id header."""
    from labbus.processors import webhooks as wh

    if new_secret:
        click.echo(wh.new_secret())
        return
    cfg = _cfg()
    try:
        targets = wh.targets_of(cfg)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        for t in targets:
            click.echo(f"{t.name}: {t.endpoint} <- {', '.join(t.event_types)} "
                       f"(topics {', '.join(s.name for s in t.topics())}; at most "
                       f"{t.max_attempts} attempts, {t.worst_case_s():.0f} s)")
        return
    _run_process("webhooks", metrics_port)


# -- the gRPC gateway and device certificates ------------------------------------------------
@main.group()
def gateway() -> None:
    """Ingress for instruments that cannot run a Kafka client."""


@gateway.command("grpc")
@click.option("--host", default=None, help="Bind address (default LABBUS_GATEWAY_HOST).")
@click.option("--port", type=int, default=None, help="Port (default LABBUS_GATEWAY_PORT).")
@click.option("--insecure", is_flag=True,
              help="Plain text, no certificates: callers name themselves in metadata. Refused "
                   "unless the bind address is loopback.")
@click.option("--name", default="gateway-0", show_default=True,
              help="This gateway's name (in heartbeats and logs).")
@metrics_option
def gateway_grpc(host: str | None, port: int | None, insecure: bool, name: str,
                 metrics_port: int | None) -> None:
    """The gRPC gateway: devices register, stream readings and answer commands over mTLS."""
    from labbus.events import pki
    from labbus.producers.gateway import server

    cfg = _cfg()
    if insecure and not server.is_loopback(host or cfg.gateway_host):
        raise click.ClickException(
            f"refusing --insecure on {host or cfg.gateway_host}: plain text is allowed only on "
            "a loopback address (127.0.0.1, ::1, localhost)")
    _start_process("gateway-grpc", cfg, metrics_port)
    try:
        _run_until_signal(lambda stop: server.serve(cfg, stop, insecure=insecure, host=host,
                                                    port=port, name=name))
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None


@gateway.command("http")
@click.option("--host", default=None, help="Bind address (default LABBUS_HTTP_GATEWAY_HOST).")
@click.option("--port", type=int, default=None, help="Port (default LABBUS_HTTP_GATEWAY_PORT).")
def gateway_http(host: str | None, port: int | None) -> None:
    """The command gateway (HTTP): the built-in token issuer (POST /auth/token, JWKS) for now;
    OpenAPI at /docs, metrics at /metrics. See README "Identity and tokens"."""
    import os

    import uvicorn

    from labbus.events.db import connect_pool
    from labbus.producers.http_gateway import keys
    from labbus.producers.http_gateway.app import create_app
    from labbus.projections.migrate import migrate

    # --host/--port are the issuer's address too (unless LABBUS_AUTH_ISSUER names another)
    overrides = {k: str(v) for k, v in (("LABBUS_HTTP_GATEWAY_HOST", host),
                                        ("LABBUS_HTTP_GATEWAY_PORT", port)) if v is not None}
    cfg = _cfg({**os.environ, **overrides})
    logs.configure("gateway-http", cfg.log_level)

    async def prepare() -> None:  # the users and credentials tables
        pool = await connect_pool(cfg.postgres_dsn, "LABBUS_POSTGRES_DSN")
        try:
            async with pool.acquire() as con:
                await migrate(con)
        finally:
            await pool.close()

    try:
        asyncio.run(prepare())
        if cfg.auth_built_in:
            key = keys.load_or_create(cfg.auth_keys_dir)
            click.echo(f"gateway-http: issuer {cfg.auth_issuer}, signing key {key.kid} "
                       f"({key.path})", err=True)
    except (ConnectionError, keys.SigningKeyError) as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(create_app(cfg), host=cfg.http_gateway_host, port=cfg.http_gateway_port,
                log_config=None, access_log=False)


# -- users of the built-in token issuer --------------------------------------------------------
@main.group()
def users() -> None:
    """Users of the built-in token issuer: lifecycle events on lab.users, password hashes in
    PostgreSQL (needs broker access and the writer role, LABBUS_POSTGRES_DSN)."""


def _users(work):
    from labbus.deploy.users import UserError
    from labbus.events.identity import UnknownRole

    try:
        return asyncio.run(work)
    except (UserError, UnknownRole, ConnectionError) as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # a malformed email or password
        raise click.BadParameter(str(exc)) from None


@users.command("add")
@click.argument("email")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(list(ROLES)),
              help="A role (repeatable); README \"Identity and tokens\" says what each may do.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input (else a prompt).")
def users_add(email: str, roles: tuple[str, ...], password_stdin: bool) -> None:
    """Add a user who logs in with EMAIL and a password (at least 8 characters); prints the
    user id. The user can get tokens once the PostgreSQL projector has projected them."""
    from labbus.deploy import users as u

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True,
                                err=True)
    click.echo(_users(u.add(_cfg(), email, list(roles), password)))
    click.echo("added; the user can get tokens (POST /auth/token on `labbus gateway http`) once "
               "`labbus project postgres` has projected lab.users", err=True)


@users.command("grant")
@click.argument("email")
@click.argument("role", type=click.Choice(list(ROLES)))
def users_grant(email: str, role: str) -> None:
    """Grant ROLE to the user EMAIL (RoleGranted); their next token carries it."""
    from labbus.deploy import users as u

    event = _users(u.grant(_cfg(), email, role))
    click.echo(f"granted {role} to {event.user_id}")


@users.command("revoke")
@click.argument("email")
@click.argument("role", type=click.Choice(list(ROLES)))
def users_revoke(email: str, role: str) -> None:
    """Revoke ROLE from the user EMAIL (RoleRevoked). Their next token lacks it; tokens already
    issued keep it until they expire (LABBUS_AUTH_TOKEN_TTL_S)."""
    from labbus.deploy import users as u

    event = _users(u.revoke(_cfg(), email, role))
    click.echo(f"revoked {role} from {event.user_id}")


@users.command("disable")
@click.argument("email")
@click.option("--reason", default="disabled by an administrator", show_default=True,
              help="Why (kept in the event and the users read model).")
def users_disable(email: str, reason: str) -> None:
    """Disable the user EMAIL (UserDisabled): no more tokens. Tokens already issued work until
    they expire (LABBUS_AUTH_TOKEN_TTL_S)."""
    from labbus.deploy import users as u

    event = _users(u.disable(_cfg(), email, reason))
    click.echo(f"disabled {event.user_id}")


@users.command("quota")
@click.argument("email")
@click.argument("wells", type=click.IntRange(1, 1_000_000))
@click.option("--note", default="", help="Why (free text).")
def users_quota(email: str, wells: int, note: str) -> None:
    """Add WELLS to the colour-lab quota of the user EMAIL (QuotaGranted)."""
    from labbus.deploy import users as u

    event = _users(u.grant_quota(_cfg(), email, wells, note))
    click.echo(f"granted {wells} wells to {event.user_id}")


@users.command("list")
def users_list() -> None:
    """The users as the issuer sees them (the users read model)."""
    from labbus.deploy import users as u

    for r in _users(u.listing(_cfg())):
        state = "disabled" if r["disabled"] else "active"
        click.echo(f"{r['email']:32} {state:8} {','.join(r['roles']) or '-':28} "
                   f"quota={r['quota_granted_wells']} "
                   f"left={'-' if r['quota_remaining'] is None else r['quota_remaining']} "
                   f"{r['user_id']}")


@main.group()
def devices() -> None:
    """The device certificate authority (files under LABBUS_HOME/pki)."""


@devices.command("init-ca")
@click.option("--host", "hosts", multiple=True,
              help="Another name or address of the gateway for its certificate (repeatable).")
@click.option("--force", is_flag=True, help="Replace an existing CA (every certificate it "
                                            "signed stops working).")
def devices_init_ca(hosts: tuple[str, ...], force: bool) -> None:
    """Create the device CA and the gateway's server certificate (kept when they exist)."""
    from labbus.events import pki

    p = pki.init_ca(_cfg().pki_dir, hosts, force)
    click.echo(f"CA          {p.ca_cert}\ngateway     {p.server_cert}")


@devices.command("issue-cert")
@click.argument("device_id")
@click.option("--role", type=click.Choice(["device", "operator"]), default="device",
              show_default=True, help="device: registers and streams as DEVICE_ID; operator: "
                                      "sends commands and queries.")
@click.option("--days", default=825, show_default=True, help="Validity.")
@click.option("--force", is_flag=True, help="Replace an existing certificate.")
def devices_issue_cert(device_id: str, role: str, days: int, force: bool) -> None:
    """Sign a client certificate whose subject CN is DEVICE_ID."""
    from labbus.events import pki

    try:
        cert, key = pki.issue_cert(_cfg().pki_dir, device_id, role, days, force)
    except pki.PkiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"certificate {cert}\nkey         {key}")


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
@click.option("--id", "experiment_id", default=None,
              help="Experiment id, straight to Kafka only (default: generated; through the "
                   "gateway it derives from --idempotency-key).")
@click.option("--idempotency-key", default=None,
              help="Through the gateway: the same key again is the same request.")
@VIA
def experiment_start(target: str, budget: int, batch: int, dyes: str, tolerance: float,
                     experiment_id: str | None, idempotency_key: str | None, via: str) -> None:
    """Request an experiment: through the command gateway when logged in, else straight to
    Kafka; prints its id (follow it with `labbus experiment watch ID`)."""
    from labbus.deploy import experiment as exp
    from labbus.events.colour_target import TargetError

    cfg = _cfg()
    token = _route(via, cfg)
    dye_list = [d.strip() for d in dyes.split(",") if d.strip()]
    try:
        req = exp.request(target, budget, batch, dye_list, tolerance, experiment_id)
    except TargetError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    if token is None:
        asyncio.run(exp.publish(cfg, req))
        click.echo(req.experiment_id)
        return
    if experiment_id is not None:
        raise click.UsageError("--id works straight to Kafka only (--via kafka); through the "
                               "gateway the id derives from --idempotency-key")
    from labbus.deploy import login as lg

    try:
        answer = lg.post(cfg, token, "/experiments", {
            "target": target, "dyes": dye_list, "budget_wells": budget, "batch_size": batch,
            "tolerance_de": tolerance}, idempotency_key)
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(answer["experiment_id"])


@experiment.command("cancel")
@click.argument("experiment_id")
@click.option("--reason", default="cancelled from the command line", show_default=True,
              help="Why (kept in the event).")
@VIA
def experiment_cancel(experiment_id: str, reason: str, via: str) -> None:
    """Cancel a campaign: no new batch starts (a robot run in flight may finish), the unused
    wells go back to the quota. Through the command gateway when logged in (one's own campaigns,
    anyone's with read:all), else straight to Kafka. Prints the cancel request's event id."""
    from labbus.deploy import experiment as exp

    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        event = exp.cancel_request(experiment_id, reason)
        asyncio.run(exp.publish(cfg, event))
        click.echo(str(event.event_id))
        return
    from labbus.deploy import login as lg

    try:
        answer = lg.post(cfg, token, f"/experiments/{experiment_id}/cancel", {"reason": reason})
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(answer["event_id"])


@experiment.command("watch")
@click.argument("experiment_id")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0 = never).")
def experiment_watch(experiment_id: str, timeout: float) -> None:
    """Follow an experiment: wells used, best ΔE00, until it completes, fails, is rejected or
    cancelled."""
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


@main.group()
def db() -> None:
    """PostgreSQL read-model upkeep (writer role, LABBUS_POSTGRES_DSN)."""


@db.command("partitions")
@click.option("--ahead", default=7, show_default=True, type=click.IntRange(0, 366),
              help="Days ahead of today to create partitions for.")
@click.option("--retention-days", type=click.IntRange(1, 36_500), default=None,
              help="Days of readings to keep (default LABBUS_MEASUREMENT_RETENTION_DAYS).")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
def db_partitions(ahead: int, retention_days: int | None, dry_run: bool) -> None:
    """Create the daily partitions of `measurements` ahead, move rows of partitioned days out of
    the default partition, drop the partitions older than the retention (the PostgreSQL
    projector does the same at start and hourly)."""
    from labbus.events.db import connect_pool
    from labbus.projections import partitions
    from labbus.projections.migrate import migrate

    cfg = _cfg()
    keep = retention_days or cfg.measurement_retention_days

    async def go() -> partitions.Report:
        pool = await connect_pool(cfg.postgres_dsn, "LABBUS_POSTGRES_DSN")
        try:
            async with pool.acquire() as con:
                await migrate(con)
                return await partitions.maintain(con, keep, ahead=ahead, dry_run=dry_run,
                                                 echo=click.echo)
        finally:
            await pool.close()

    click.echo(f"measurements: daily partitions, {ahead} days ahead, keeping {keep} days"
               + (" (dry run)" if dry_run else ""))
    try:
        report = asyncio.run(go())
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    would = "would be " if dry_run else ""
    click.echo(f"{len(report.created)} partitions {would}created, {len(report.dropped)} "
               f"{would}dropped, {report.deleted_from_default:,} rows {would}deleted from the "
               f"default partition; {report.partitions} daily partitions now")


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


# -- test protocols ---------------------------------------------------------------------------
@main.group()
def testing() -> None:
    """Test protocols: service requests (PV module qualification, issue 11)."""


@testing.command("submit")
@click.option("--customer", required=True)
@click.option("--module-type", required=True,
              help="The module model (a CEC database name for the simulated instruments).")
@click.option("--area", "module_area_m2", type=float, required=True, help="Module area, m².")
@click.option("--sample", "samples", multiple=True, required=True, help="A sample id "
              "(repeatable).")
@click.option("--protocol", "protocols", multiple=True, required=True,
              help="A protocol id, e.g. PVTP-015, or PVTP-015@1 for a template version "
                   "(repeatable).")
@click.option("--input", "inputs", multiple=True,
              help="PROTOCOL.NAME=VALUE, an input of a template (repeatable).")
@click.option("--idempotency-key", default=None,
              help="Through the gateway: the same key again is the same request.")
@VIA
def testing_submit(customer: str, module_type: str, module_area_m2: float,
                   samples: tuple[str, ...], protocols: tuple[str, ...],
                   inputs: tuple[str, ...], idempotency_key: str | None, via: str) -> None:
    """Submit a service request: each sample runs each protocol. Each sample must have been
    registered (`labbus samples register`) for this customer, module type and area, else the
    testing processor rejects the request with the reason. Through the command gateway when
    logged in (engineer, operator), else straight to Kafka; prints the request id."""
    import getpass
    import uuid

    from labbus.events.model import submit_service_request
    from labbus.events.protocols import RequestError, resolve_request, shipped_catalog

    requested = []
    for text in protocols:
        pid, _, version = text.partition("@")
        requested.append({"protocol_id": pid, "version": int(version) if version else None,
                          "inputs": {}})
    for text in inputs:
        target, _, value = text.partition("=")
        pid, _, name = target.partition(".")
        match = [p for p in requested if p["protocol_id"] == pid]
        if not (match and name and value):
            raise click.BadParameter(f"{text!r}: expected PROTOCOL.NAME=VALUE of a --protocol",
                                     param_hint="--input")
        try:
            match[0]["inputs"][name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{text!r}: {value!r} is not a number",
                                     param_hint="--input") from None
    try:
        resolve_request(shipped_catalog(), list(samples), requested, module_area_m2)
    except RequestError as exc:
        raise click.ClickException("; ".join(exc.problems)) from None
    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        rid = f"sr-{uuid.uuid4().hex[:12]}"
        event = submit_service_request(rid, customer, module_type, module_area_m2,
                                       list(samples), requested, getpass.getuser())
        from labbus.events import kafka

        asyncio.run(kafka.publish(cfg, event))
        click.echo(rid)
        return
    from labbus.deploy import login as lg

    try:
        answer = lg.post(cfg, token, "/service-requests", {
            "customer": customer, "module_type": module_type, "module_area_m2": module_area_m2,
            "sample_ids": list(samples), "protocols": requested}, idempotency_key)
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(answer["request_id"])


@testing.command("watch")
@click.argument("request_id")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0 = never).")
def testing_watch(request_id: str, timeout: float) -> None:
    """Follow a service request on lab.testing.requests until it completes or is rejected;
    exit 1 unless every execution passed."""
    from labbus.events import kafka
    from labbus.events.model import ServiceRequestCompleted, ServiceRequestRejected
    from labbus.events.topics import TESTING_REQUESTS, topic_name

    def on_event(event) -> bool:
        if isinstance(event, ServiceRequestRejected):
            click.echo(f"rejected: {'; '.join(event.reasons)}")
            return True
        if isinstance(event, ServiceRequestCompleted):
            click.echo(f"completed: {event.verdict} ({event.passed} of {event.executions} "
                       f"executions passed, {event.failed} failed)")
            return True
        click.echo(f"{event.TYPE.rsplit('.', 1)[-1]}", err=True)
        return False

    cfg = _cfg()
    final = asyncio.run(kafka.follow_key(cfg, topic_name(cfg, TESTING_REQUESTS), request_id,
                                         on_event, timeout or None))
    if final is None:
        raise click.ClickException(f"no outcome for {request_id} within {timeout:g} s")
    if not (isinstance(final, ServiceRequestCompleted) and final.verdict == "pass"):
        sys.exit(1)


def _gateway_post(cfg, token, path: str, body: dict, idempotency_key: str | None = None) -> dict:
    """POST through the command gateway with the stored token; a refusal as a ClickException."""
    from labbus.deploy import login as lg

    try:
        return lg.post(cfg, token, path, body, idempotency_key)
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None


@testing.command("inspect")
@click.argument("request_id")
@click.option("--sample", "sample_id", required=True, help="One of the request's samples.")
@click.option("--finding", "findings", multiple=True, help="What was seen (repeatable).")
@click.option("--defect", "defects", multiple=True, help="A defect found (repeatable; none: "
                                                         "no defect).")
@click.option("--photo", "photos", multiple=True, help="A photo's URI (repeatable).")
@click.option("--idempotency-key", default=None,
              help="Through the gateway: the same key again is the same inspection.")
@VIA
def testing_inspect(request_id: str, sample_id: str, findings: tuple[str, ...],
                    defects: tuple[str, ...], photos: tuple[str, ...],
                    idempotency_key: str | None, via: str) -> None:
    """Record the visual inspection of one of a service request's samples (InspectionRecorded;
    shown on GET /service-requests/{id} and in its report). Through the command gateway when
    logged in (result:record: engineer, operator; it refuses an unknown request or a sample not
    of it), else straight to Kafka. Prints the event id."""
    import getpass

    from labbus.events.model import InspectionRecorded

    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        from labbus.events import kafka

        event = InspectionRecorded.create(
            source="cli", subject=request_id, sequence=0, request_id=request_id,
            sample_id=sample_id, inspector=getpass.getuser(), findings=list(findings),
            defects=list(defects), photo_refs=list(photos))
        asyncio.run(kafka.publish(cfg, event))
        click.echo(str(event.event_id))
        return
    answer = _gateway_post(cfg, token, f"/service-requests/{request_id}/inspections", {
        "sample_id": sample_id, "findings": list(findings), "defects": list(defects),
        "photo_refs": list(photos)}, idempotency_key)
    click.echo(answer["event_id"])


@testing.command("abort")
@click.argument("execution_id")
@click.option("--reason", required=True, help="Why (the execution's failure reason says it).")
@VIA
def testing_abort(execution_id: str, reason: str, via: str) -> None:
    """Abort a running execution: the testing processor ends it as ExecutionFailed `aborted`
    with the reason (the instrument's command in flight is not cancelled; its answer is
    ignored); the request completes with its other executions' verdicts. An execution that
    already ended is left as it is (the gateway answers 409 saying how it ended). Through the
    command gateway when logged in (execution:abort: engineer, operator), else straight to
    Kafka. Prints the abort request's event id."""
    import getpass

    from labbus.events.model import request_abort

    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        from labbus.events import kafka

        event = request_abort(execution_id, reason, getpass.getuser())
        asyncio.run(kafka.publish(cfg, event))
        click.echo(str(event.event_id))
        return
    answer = _gateway_post(cfg, token, f"/executions/{execution_id}/abort", {"reason": reason})
    click.echo(answer["event_id"])


@main.group()
def samples() -> None:
    """Samples the lab received, as its LIMS registers them (issue 11)."""


@samples.command("register")
@click.argument("sample_id")
@click.option("--lims-ref", required=True, help="The LIMS's own reference of the sample.")
@click.option("--customer", required=True)
@click.option("--module-type", required=True,
              help="The module model (a CEC database name for the simulated instruments).")
@click.option("--area", "module_area_m2", type=float, required=True, help="Module area, m².")
@click.option("--serial", "serial_number", required=True, help="The module's serial number.")
@click.option("--received-at", type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M%z",
                                                    "%Y-%m-%d"]),
              default=None, help="When the lab received it, e.g. 2026-03-01T09:30:00+01:00 "
                                 "(default: now).")
@click.option("--idempotency-key", default=None,
              help="Through the gateway: the same key again is the same registration.")
@VIA
def samples_register(sample_id: str, lims_ref: str, customer: str, module_type: str,
                     module_area_m2: float, serial_number: str, received_at,
                     idempotency_key: str | None, via: str) -> None:
    """Register a received sample (SampleRegistered): a service request may then name it, for
    the same customer, module type and area. Registering it again replaces the registration for
    requests submitted after. Through the command gateway when logged in
    (service-request:submit: engineer, operator), else straight to Kafka. Prints the event id."""
    import getpass
    from datetime import UTC, datetime

    from labbus.events.model import register_sample

    if received_at is None:
        received_at = datetime.now(UTC)
    elif received_at.tzinfo is None:  # a date alone: midnight UTC
        received_at = received_at.replace(tzinfo=UTC)
    if not 0 < module_area_m2 <= 10:
        raise click.BadParameter("the area is in m², above 0 and at most 10",
                                 param_hint="--area")
    cfg = _cfg()
    token = _route(via, cfg)
    if token is None:
        from labbus.events import kafka

        event = register_sample(sample_id, lims_ref, customer, module_type, module_area_m2,
                                serial_number, received_at, getpass.getuser())
        asyncio.run(kafka.publish(cfg, event))
        click.echo(str(event.event_id))
        return
    answer = _gateway_post(cfg, token, "/samples", {
        "sample_id": sample_id, "lims_ref": lims_ref, "customer": customer,
        "module_type": module_type, "module_area_m2": module_area_m2,
        "serial_number": serial_number, "received_at": received_at.isoformat()},
        idempotency_key)
    click.echo(answer["event_id"])
