"""`labbus demo`: every labbus process against the local services, with a simulated fleet and one
closed-loop colour campaign (experiment processor, OT-2 agent in simulation, plate reader).

The query API needs a token: the demo runs the command gateway (the built-in issuer) and signs a
viewer's token with the issuer's key (it runs on the labbus host, where the key is), prints it and
reads the API with it. With the lab's own identity provider (LABBUS_AUTH_ISSUER) it cannot: it
says so, and the API's answers need a token of that provider."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from labbus.events.config import Config
from labbus.events.metrics import DEFAULT_PORTS

LABBUS = str(Path(sys.executable).parent / "labbus")
# The simulated camera's colour of 40 µL red + 30 µL yellow + 60 µL blue: a reachable target.
DEMO_TARGET = "#759e8f"


def run(cfg: Config, *, devices: int, rate: float, bad_fraction: float, duration: int,
        echo=print) -> None:
    from labbus.deploy.local import services

    echo("starting local services (the first time downloads Kafka and may take a few minutes)")
    for name, address in services.up(cfg, echo=echo).items():
        echo(f"  {name:9} {services.masked(address)}")
    logdir = cfg.home / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    commands = {
        "validator": ["process", "validate"],
        "projector-postgres": ["project", "postgres"],
        "projector-mongo": ["project", "mongo"],
        "api": ["api"],
        "gateway-http": ["gateway", "http"],
        "agent": ["agent", "sim", "--devices", str(devices), "--rate", str(rate),
                  "--bad-fraction", str(bad_fraction)],
        "experiment": ["process", "experiment"],
        "quota": ["process", "quota"],
        "agent-ot2": ["agent", "ot2", "--simulate"],
        "agent-reader": ["agent", "reader"],
    }
    children: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name, args in commands.items():
            log = open(logdir / f"{name}.log", "a")
            children[name] = subprocess.Popen([LABBUS, *args], stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        base = f"http://{cfg.api_host}:{cfg.api_port}"
        _wait_ready(base, children, logdir)
        _wait_ready(f"http://{cfg.http_gateway_host}:{cfg.http_gateway_port}", children, logdir)
        xid = _start_campaign(cfg)
        echo("\nlabbus is running. Open:")
        echo(f"  API docs (OpenAPI)    {base}/docs")
        token = _viewer_token(cfg)
        if token:
            echo(f"  every API route but /health and /metrics needs a token; a viewer's, "
                 f"valid {cfg.auth_token_ttl_s // 60} min (Authorize in /docs):\n"
                 f"    curl -H 'Authorization: Bearer {token}' {base}/devices")
        else:
            echo("  every API route but /health and /metrics needs a token of "
                 f"{cfg.auth_issuer}")
        echo(f"  devices               {base}/devices")
        echo(f"  one device's readings {base}/devices/sim-0000/measurements")
        echo(f"  readiness             {base}/health/ready")
        echo(f"  API metrics           {base}/metrics")
        echo(f"  colour campaign       {base}/experiments/{xid}  (target {DEMO_TARGET}, "
             "budget 96, batch 8)")
        echo(f"  its plate             {base}/experiments/{xid}/plate.svg")
        echo(f"  follow it             labbus experiment watch {xid}")
        for name in ("agent", "validator", "projector-postgres", "projector-mongo", "experiment",
                     "quota", "agent-ot2", "agent-reader"):
            echo(f"  {name + ' metrics':21} http://127.0.0.1:{DEFAULT_PORTS[name]}/metrics")
        echo(f"  logs (JSON lines)     {logdir}/")
        echo("Ctrl-C stops the processes (services keep running: `labbus services down`).")
        deadline = time.monotonic() + duration if duration else None
        while not stopping and (deadline is None or time.monotonic() < deadline):
            for name, child in children.items():
                if child.poll() is not None:
                    raise SystemExit(f"{name} exited with {child.returncode}; see "
                                     f"{logdir / (name + '.log')}")
            time.sleep(0.5)
        headers = {"Authorization": f"Bearer {_viewer_token(cfg)}"}
        _summary(base, headers, echo)
        _campaign_summary(base, xid, headers, echo)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


def _wait_ready(base: str, children: dict[str, subprocess.Popen], logdir: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                raise SystemExit(f"{name} exited with {child.returncode}; see "
                                 f"{logdir / (name + '.log')}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the API did not become ready within 120 s; see {logdir}/api.log")


def _viewer_token(cfg: Config) -> str | None:
    """A viewer's token signed with the built-in issuer's key (None when it is off)."""
    if not cfg.auth_built_in:
        return None
    from labbus.producers.http_gateway import keys
    from labbus.producers.http_gateway.issuer import Issuer

    key = keys.load_or_create(cfg.auth_keys_dir)
    return Issuer.from_config(cfg, key).mint("demo", ("viewer",))[0]


def _summary(base: str, headers: dict, echo) -> None:
    try:
        devices = httpx.get(f"{base}/devices", params={"limit": 1000}, headers=headers,
                            timeout=5).json()["items"]
        total = 0
        for d in devices:
            total += httpx.get(f"{base}/devices/{d['device_id']}", headers=headers,
                               timeout=5).json().get("total_measurements", 0)
        echo(f"\n{len(devices)} devices, {total} validated readings projected so far")
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        echo(f"(could not read the summary from the API: {exc})")


def _start_campaign(cfg: Config) -> str:
    """Publish one ExperimentRequested; returns its experiment id."""
    from labbus.deploy import experiment

    req = experiment.request(DEMO_TARGET, budget=96, batch=8, dyes=["red", "yellow", "blue"],
                             experiment_id=f"demo-{uuid.uuid4().hex[:8]}", requested_by="demo")
    # as `labbus experiment start` would: the operator principal, not the demo's admin
    asyncio.run(experiment.publish(dataclasses.replace(cfg, kafka_principal="operator"), req))
    return req.experiment_id


def _campaign_summary(base: str, xid: str, headers: dict, echo) -> None:
    try:
        body = httpx.get(f"{base}/experiments/{xid}", headers=headers, timeout=5)
        if body.status_code == 404:
            echo(f"colour campaign {xid}: not projected yet")
            return
        body = body.json()
        best = body.get("best_de")
        echo(f"colour campaign {xid}: {body.get('status')}, {body.get('wells_used')} wells"
             + ("" if best is None else f", best ΔE00 {best:.2f}"))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        echo(f"(could not read the campaign from the API: {exc})")
