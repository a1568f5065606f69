"""`labbus demo`: every labbus process against the local services, with a simulated fleet."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from events.config import Config
from events.metrics import DEFAULT_PORTS

LABBUS = str(Path(sys.executable).parent / "labbus")


def run(cfg: Config, *, devices: int, rate: float, bad_fraction: float, duration: int,
        echo=print) -> None:
    from deploy.local import services

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
        "agent": ["agent", "sim", "--devices", str(devices), "--rate", str(rate),
                  "--bad-fraction", str(bad_fraction)],
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
        echo("\nlabbus is running. Open:")
        echo(f"  API docs (OpenAPI)    {base}/docs")
        echo(f"  devices               {base}/devices")
        echo(f"  one device's readings {base}/devices/sim-0000/measurements")
        echo(f"  readiness             {base}/health/ready")
        echo(f"  API metrics           {base}/metrics")
        for name in ("agent", "validator", "projector-postgres", "projector-mongo"):
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
        _summary(base, echo)
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


def _summary(base: str, echo) -> None:
    try:
        devices = httpx.get(f"{base}/devices", params={"limit": 1000}, timeout=5).json()["items"]
        total = 0
        for d in devices:
            total += httpx.get(f"{base}/devices/{d['device_id']}", timeout=5).json().get(
                "total_measurements", 0)
        echo(f"\n{len(devices)} devices, {total} validated readings projected so far")
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        echo(f"(could not read the summary from the API: {exc})")
