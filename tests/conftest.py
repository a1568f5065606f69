"""Test fixtures: the real Kafka, PostgreSQL and Mongo-compatible servers, one namespace per run.

By default the project's own local services are used (`labbus services up`, started here when
they are not running). Where a Docker engine exists, LABBUS_TEST_SERVICES=docker starts the three
with testcontainers instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from labbus.deploy.demo import LABBUS  # the installed `labbus` next to this Python
from labbus.events import config, kafka

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def consumer_lag(metrics_url: str, process: str) -> float | None:
    """Sum of a labbus process's labbus_consumer_lag gauges (its `--metrics-port`), None while
    it has reported none."""
    found = [float(line.rsplit(" ", 1)[1]) for line in httpx.get(metrics_url).text.splitlines()
             if line.startswith("labbus_consumer_lag{") and f'process="{process}"' in line]
    return sum(found) if found else None


def _docker_services() -> dict[str, str]:
    """Kafka, PostgreSQL (writer and SELECT-only reader, as `labbus services up` sets them up)
    and MongoDB in containers. Written for machines with a Docker engine; the development
    machine has none, so this path has not been run there."""
    import asyncpg
    from testcontainers.kafka import KafkaContainer
    from testcontainers.mongodb import MongoDbContainer
    from testcontainers.postgres import PostgresContainer

    from labbus.deploy.local import postgres

    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # the docker client raises several kinds
        pytest.exit(f"LABBUS_TEST_SERVICES=docker needs a running Docker engine ({exc}); "
                    "unset it to test against labbus's own local services", returncode=2)
    kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft().start()
    pg = PostgresContainer("postgres:16", username="postgres", password="postgres",
                           dbname="postgres").start()
    host, port = pg.get_container_host_ip(), int(pg.get_exposed_port(5432))
    writer = f"postgresql://labbus_writer:labbus_writer@{host}:{port}/labbus"
    reader = f"postgresql://labbus_reader:labbus_reader@{host}:{port}/labbus"

    def admin(database: str):
        return asyncpg.connect(host=host, port=port, user="postgres", password="postgres",
                               database=database)

    asyncio.run(postgres.provision_roles(admin, writer, reader, "labbus",
                                         admin_database="postgres"))
    mongo = MongoDbContainer("mongo:7").start()
    return {"LABBUS_KAFKA_BOOTSTRAP": kafka.get_bootstrap_server(),
            "LABBUS_POSTGRES_DSN": writer, "LABBUS_POSTGRES_API_DSN": reader,
            "LABBUS_MONGO_URL": mongo.get_connection_url()}


@pytest.fixture(scope="session")
def base_env() -> dict[str, str]:
    """Environment pointing at running services (started here if needed)."""
    env = dict(os.environ)
    if os.environ.get("LABBUS_TEST_SERVICES") == "docker":
        env.update(_docker_services())
        return env
    from labbus.deploy.local import services

    # restart=False: a server other sessions use is never stopped under them by a test run
    services.up(config.load(env), echo=lambda m: print(m, file=sys.stderr), restart=False)
    return env


@pytest.fixture(scope="session")
def env(base_env) -> dict[str, str]:
    """A private namespace for this test session: topics, consumer groups, databases."""
    run = uuid.uuid4().hex[:8]
    cfg = config.load(base_env)
    e = dict(base_env)
    e["LABBUS_NAMESPACE"] = f"test-{run}"
    e["LABBUS_MONGO_DB"] = f"labbus_test_{run}"
    e["LABBUS_LOG_LEVEL"] = "WARNING"
    # a developer's own `labbus login` must not send the tests' CLI commands to a gateway
    e["LABBUS_TOKEN_FILE"] = str(Path(tempfile.gettempdir()) / f"labbus-test-{run}-token.json")
    db = f"labbus_test_{run}"
    if os.environ.get("LABBUS_TEST_SERVICES") != "docker":
        from labbus.deploy.local import postgres

        e["LABBUS_POSTGRES_DSN"] = postgres.create_database(cfg, db)
        e["LABBUS_POSTGRES_API_DSN"] = postgres.with_database(cfg.postgres_api_dsn, db)
    # the namespace's topics and, on the secured local broker, its ACLs (events/access.py), as
    # admin: every process kind then runs with exactly its own rights in this namespace
    asyncio.run(kafka.ensure_topics(config.load(e)))
    yield e
    from labbus.processors import validator

    asyncio.run(kafka.delete_namespace_topics(cfg, e["LABBUS_NAMESPACE"]))
    shutil.rmtree(validator.data_dir(config.load(e)), ignore_errors=True)
    if os.environ.get("LABBUS_TEST_SERVICES") != "docker":
        from pymongo import MongoClient

        from labbus.deploy.local import postgres

        postgres.drop_database(cfg, db)
        MongoClient(cfg.mongo_url).drop_database(e["LABBUS_MONGO_DB"])


@pytest.fixture(scope="session")
def cfg(env) -> config.Config:
    return config.load(env)


@pytest.fixture(scope="session")
def tokens():
    """A stand-in OpenID provider on loopback (tests/support/idp.py) minting test tokens."""
    from tests.support.idp import Tokens

    issuer = Tokens()
    yield issuer
    issuer.close()


@pytest.fixture(scope="session")
def query_api(tokens):
    """`query_api(cfg)`: a TestClient of the query API (`with query_api(cfg) as client:`) that
    trusts the stand-in issuer and sends a token with every request: a viewer's by default
    (read:all), or `roles` and `user` of the test's choosing."""
    from fastapi.testclient import TestClient

    from labbus.api.app import create_app

    def client(cfg: config.Config, roles=("viewer",), user: str = "tester") -> TestClient:
        return TestClient(create_app(tokens.config(cfg)), headers=tokens.headers(user, roles))

    return client


@contextlib.contextmanager
def http_server(args: list[str], env: dict[str, str], log_path: Path, ready_url: str,
                timeout: float = 60):
    """A labbus HTTP process (`labbus api`, `labbus gateway http`) started as a user would, once
    `ready_url` answers 200; terminated on exit."""
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen([LABBUS, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"`labbus {' '.join(args)}` exited with {proc.returncode}: "
                                 f"{log_path.read_text()[-2000:]}")
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout, f"{ready_url} to answer", interval=0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def walk_pages(api, path: str, **params) -> tuple[list[dict], int]:
    """Follow next_cursor through a paged API endpoint: (every item, number of pages)."""
    seen, pages = [], 0
    while True:
        r = api.get(path, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += body["items"]
        pages += 1
        if not body["next_cursor"]:
            return seen, pages
        params["cursor"] = body["next_cursor"]


# Processes that must run beside another for it to do its work: a campaign starts only once the
# quota processor has reserved its budget.
COMPANIONS = {("process", "experiment"): ("process", "quota")}


class Processes:
    """labbus worker processes started as a user would start them, killed at teardown. Starting
    one starts its COMPANIONS too (once per test, unless the test started them itself)."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.running: list[subprocess.Popen] = []
        self.started: set[tuple[str, ...]] = set()

    def start(self, *args: str, extra_env: dict[str, str] | None = None,
              companions: bool = True) -> subprocess.Popen:
        companion = COMPANIONS.get(tuple(args[:2])) if companions else None
        if companion is not None and companion not in self.started:
            self.start(*companion, extra_env=extra_env)
        self.started.add(tuple(args[:2]))
        name = "-".join(args[:2])
        log = open(self.logdir / f"{name}-{len(self.running)}.log", "w")
        port = free_port()
        proc = subprocess.Popen([LABBUS, *args, "--metrics-port", str(port)],
                                env={**self.env, **(extra_env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
        proc.log_path = log.name
        proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.terminate()
        # one 15 s grace for all of them (they stop side by side), not 15 s each in turn: two
        # processes stuck in their stop cost 30 s
        deadline = time.monotonic() + 15
        for proc in self.running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(env, tmp_path):
    procs = Processes(env, tmp_path)
    yield procs
    procs.stop_all()


def run(coro):
    return asyncio.run(coro)


@contextlib.contextmanager
def own_namespace(env: dict[str, str], tag: str):
    """(cfg, env overrides) of a namespace and Mongo database of the test's own, for a test whose
    processes would otherwise read the session's whole topics, which other tests fill (a
    projector catching up on them, a webhook target delivering every earlier event, a processor
    choosing an earlier test's stopped instrument). Its topics and, on the secured broker, its
    ACLs are made first; all is removed afterwards."""
    own = {"LABBUS_NAMESPACE": f"{env['LABBUS_NAMESPACE']}-{tag}",
           "LABBUS_MONGO_DB": f"{env['LABBUS_MONGO_DB']}_{tag.replace('-', '_')}"}
    cfg = config.load({**env, **own})
    run(kafka.ensure_topics(cfg))
    try:
        yield cfg, own
    finally:
        from pymongo import MongoClient

        run(kafka.delete_namespace_topics(cfg, own["LABBUS_NAMESPACE"]))
        MongoClient(cfg.mongo_url).drop_database(own["LABBUS_MONGO_DB"])
        for state in (cfg.home / "faust").glob(f"{own['LABBUS_NAMESPACE']}.labbus.*"):
            shutil.rmtree(state, ignore_errors=True)  # faust processors' local tables


@pytest.fixture
def own_cfg(env, processes):
    """The config of a namespace of the test's own (`own_namespace`); `processes` start in it."""
    with own_namespace(env, f"own{uuid.uuid4().hex[:4]}") as (cfg, own):
        processes.env = {**processes.env, **own}
        yield cfg
        processes.stop_all()


async def read_topic(cfg: config.Config, topic: str) -> list:
    """Every record of a topic, from the beginning to the current end, across partitions."""
    from labbus.events.kafka import read_to_end

    return [record async for record in read_to_end(cfg, topic)]
