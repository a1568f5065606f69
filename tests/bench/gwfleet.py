"""What the gateway benchmarks share: a fresh namespace with its own device CA (and, when asked,
its own PostgreSQL database), the gateway process, simulator processes (spawned, each driving a
slice of the fleet) and the measuring helpers (percentiles, CPU, peak RSS, the machine)."""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import config, kafka, pki  # noqa: E402
from labbus.producers.gateway import devices as dev  # noqa: E402
from tests.conftest import free_port  # noqa: E402


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


@dataclass
class Namespace:
    """A private namespace (topics, groups) and device CA for one benchmark run; with
    `database=True` also a PostgreSQL database of its own (the read models' projector and
    the validator run against it). `drop()` removes what the run made."""

    name: str
    env: dict
    cfg: config.Config
    pki_dir: Path
    database: str | None = None

    @classmethod
    def create(cls, prefix: str, devices: int, device_prefix: str = "bench",
               database: bool = False) -> Namespace:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "LABBUS_NAMESPACE": name, "LABBUS_LOG_LEVEL": "WARNING"}
        db = None
        if database:
            from labbus.deploy.local import postgres

            base = config.load(env)
            db = "labbus_" + name.replace("-", "_")
            env["LABBUS_POSTGRES_DSN"] = postgres.create_database(base, db)
            env["LABBUS_POSTGRES_API_DSN"] = postgres.with_database(base.postgres_api_dsn, db)
        pki_dir = Path(tempfile.mkdtemp(prefix="labbus-bench-pki-"))
        env["LABBUS_PKI_DIR"] = str(pki_dir)
        pki.init_ca(pki_dir)
        t0 = time.perf_counter()
        dev.ensure_certs(pki_dir, dev.make_fleet(devices, 0, dev.Stats(), prefix=device_prefix))
        print(f"{devices} device certificates issued in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        return cls(name, env, config.load(env), pki_dir, db)

    async def drop(self) -> None:
        """The run's topics, its database and the validator's data directory."""
        from labbus.processors import validator

        await kafka.delete_namespace_topics(self.cfg, self.name)
        if self.database:
            from labbus.deploy.local import postgres

            postgres.drop_database(config.load({**os.environ, "LABBUS_NAMESPACE": self.name}),
                                   self.database)
        shutil.rmtree(validator.data_dir(self.cfg), ignore_errors=True)

    def start(self, *args: str) -> subprocess.Popen:
        """A labbus process in this namespace, its output in the PKI directory's logs."""
        log = open(self.pki_dir / f"{'-'.join(args[:2])}.log", "w")
        return subprocess.Popen([LABBUS, *args, "--metrics-port", "-1"], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def start_gateway(self) -> tuple[subprocess.Popen, str]:
        port = free_port()
        return self.start("gateway", "grpc", "--port", str(port)), f"127.0.0.1:{port}"


class Simulators:
    """`parts` spawned processes running `worker(conn, *args, part, parts)`, talked to over a
    pipe each: `send` to all, `each()` receives one message from every process."""

    def __init__(self, worker, args: tuple, parts: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        for part in range(parts):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(theirs, *args, part, parts), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)

    def send(self, message) -> None:
        for p in self.pipes:
            p.send(message)

    async def each(self, message=None) -> list:
        import asyncio

        if message is not None:
            self.send(message)
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, p.recv)
                                           for p in self.pipes)))

    def cpu_s(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs if p.is_alive())

    def join(self, timeout: float = 30) -> None:
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
