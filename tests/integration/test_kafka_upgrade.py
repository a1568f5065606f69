"""`labbus services up` over the Kafka storage of an older labbus (a PLAINTEXT broker without
SCRAM users or ACLs): it ends with the secured broker, upgraded in place (topics and records
kept), or, when the broker cannot start on that storage, with the storage moved aside and said
so. Each test runs a broker of its own (own LABBUS_HOME and ports); the shared services are
not touched."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAuthorizationFailedError

from labbus.deploy.local import kafka as local_kafka
from labbus.deploy.local import proc, services
from labbus.events import access, config, kafka
from labbus.events.topics import EXPERIMENTS, topic_name
from tests.conftest import run


def _port_pair() -> int:
    """A port p with p + 1 free too (the broker's controller listener)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def own(tmp_path):
    """A config whose local broker lives in tmp_path on free ports; its jars are copied from
    the shared home when they are there (else Maven fetches them). Stopped afterwards."""
    shared = config.load()
    cfg = dataclasses.replace(config.load({"LABBUS_HOME": str(tmp_path)}),
                              kafka_bootstrap=f"127.0.0.1:{_port_pair()}")
    lib = local_kafka._lib(shared)
    if (lib / ".labbus-installed").exists():
        shutil.copytree(lib, local_kafka._lib(cfg))
    yield cfg
    pid = local_kafka.running_pid(cfg)
    if pid is not None:
        proc.stop(pid, timeout=60, marker=local_kafka.marker(cfg),
                  pid_file=local_kafka.pid_file(cfg))


def _older_broker(cfg) -> int:
    """Start the broker an older labbus ran: PLAINTEXT listeners, no authorizer, storage
    formatted without SCRAM users, no credentials file. Returns its pid once it answers."""
    java = local_kafka._java()
    local_kafka._install(cfg, print)
    host, port = local_kafka.endpoint(cfg)
    data = local_kafka._data(cfg)
    props = local_kafka._properties(cfg)
    props.parent.mkdir(parents=True, exist_ok=True)
    props.write_text(f"""\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={host}:{port + 1}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{port + 1}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=false
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1
""")
    local_kafka._log4j(cfg).write_text(local_kafka.LOG4J2_YAML)
    proc.run("kafka", [*local_kafka._java_cmd(cfg, java, "-Xmx256m"), "kafka.tools.StorageTool",
                       "format", "-t", local_kafka._cluster_id(), "-c", str(props),
                       "--standalone"], hint="", timeout=120)
    pid = proc.spawn([*local_kafka._java_cmd(cfg, java, *local_kafka.HEAP), "kafka.Kafka",
                      str(props)], log=local_kafka.log_path(cfg),
                     pid_file=local_kafka.pid_file(cfg), cwd=local_kafka._dir(cfg))
    proc.wait_until("kafka", cfg.kafka_bootstrap, lambda: _plaintext_problem(cfg), 90, pid=pid,
                    marker=local_kafka.marker(cfg), log=local_kafka.log_path(cfg))
    assert access.read_credentials(cfg.home) is None
    return pid


def _plaintext_problem(cfg) -> str | None:
    async def probe():
        admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap,
                                    request_timeout_ms=5000)
        try:
            await asyncio.wait_for(admin.start(), 5)
            await asyncio.wait_for(admin.list_topics(), 5)
        finally:
            await admin.close()
    try:
        run(probe())
        return None
    except Exception as e:  # noqa: BLE001 - still starting
        return repr(e)


async def _plaintext_write(cfg, topic: str, value: bytes) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()
    # a consumer group's committed offset, which the upgrade must keep too
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=cfg.kafka_bootstrap, group_id="old-g",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=5000)
        await consumer.commit()
    finally:
        await consumer.stop()


async def _read_as_admin(cfg, topic: str) -> tuple[list[bytes], int | None]:
    consumer = kafka.consumer(local_kafka.admin_cfg(cfg), topic, group=None)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
        values = [r.value for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    admin = kafka.admin(local_kafka.admin_cfg(cfg))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets("old-g")
    finally:
        await admin.close()
    return values, next((m.offset for m in offsets.values()), None)


def _assert_secured(cfg) -> None:
    """Plaintext refused, SASL_SSL as admin works, an agent may not write lab.experiments."""
    assert _plaintext_problem(cfg) is not None
    run(kafka.ensure_topics(local_kafka.admin_cfg(cfg), (EXPERIMENTS,)))

    async def agent_writes():
        producer = kafka.producer(dataclasses.replace(cfg, kafka_principal="agent-ot2"),
                                  request_timeout_ms=10_000)
        await producer.start()
        try:
            await producer.send_and_wait(topic_name(cfg, EXPERIMENTS), b"not allowed")
        finally:
            await producer.stop()
    with pytest.raises(TopicAuthorizationFailedError):
        run(asyncio.wait_for(agent_writes(), 30))


def test_older_plaintext_storage_is_upgraded_in_place_while_running(own):
    """The older broker still runs: `up` stops it, keeps its storage, adds the SCRAM users and
    restarts it secured; the old topic's record and the group's offset are still there."""
    old_pid = _older_broker(own)
    topic = f"old-{uuid.uuid4().hex[:6]}"
    run(_plaintext_write(own, topic, b"kept"))
    # as the tests call it: a running server is never stopped, the broker stays as it was
    said = []
    services.up(own, echo=said.append, only=["kafka"], restart=False)
    assert f"left running (pid {old_pid})" in "\n".join(said), said
    assert proc.pid_alive(old_pid) and _plaintext_problem(own) is None
    assert access.read_credentials(own.home) is None  # clients still speak PLAINTEXT to it
    said = []
    services.up(own, echo=said.append, only=["kafka"])
    text = "\n".join(said)
    assert f"restarting pid {old_pid}" in text and "without SASL_SSL" in text, text
    assert "upgrading it in place" in text and "added SCRAM users" in text, text
    assert "moved it" not in text and "formatting" not in text, text
    assert not proc.pid_alive(old_pid)
    assert not local_kafka._pending(own)
    _assert_secured(own)
    assert run(_read_as_admin(own, topic)) == ([b"kept"], 1)
    # a second `up` finds it secured and running: nothing to do
    again = []
    services.up(own, echo=again.append, only=["kafka"])
    assert not any("restarting" in line or "SCRAM" in line for line in again), again


def test_a_principal_new_since_the_broker_started_gets_its_scram_user(own):
    """A later labbus adds a principal: `up` on the running broker adds its SCRAM user."""
    services.up(own, echo=lambda _: None, only=["kafka"])
    creds = access.read_credentials(own.home)
    gone = "gateway-http"
    del creds.passwords[gone]  # as a credentials file written before that principal existed
    access.write_credentials(own.home, creds)
    said = []
    services.up(own, echo=said.append, only=["kafka"])
    assert f"added SCRAM users {gone}" in "\n".join(said), said
    run(kafka.ensure_topics(dataclasses.replace(own, kafka_principal=gone)))  # authenticates


def test_storage_the_broker_cannot_start_on_is_moved_aside_and_said_so(own):
    """Older storage the secured broker cannot use (here: another node's, so the broker exits)
    is renamed, never deleted, and `up` still ends with a secured broker."""
    old_pid = _older_broker(own)
    proc.stop(old_pid, timeout=60, marker=local_kafka.marker(own),
              pid_file=local_kafka.pid_file(own))
    meta = local_kafka._data(own) / "meta.properties"
    meta.write_text(meta.read_text().replace("node.id=1", "node.id=7"))
    said = []
    services.up(own, echo=said.append, only=["kafka"])
    text = "\n".join(said)
    assert "upgrading it in place" in text and "moved it to" in text, text
    aside = [p for p in local_kafka._dir(own).iterdir() if p.name.startswith("data.before-sasl")]
    assert len(aside) == 1 and (aside[0] / "meta.properties").exists()
    assert aside[0].name in text
    _assert_secured(own)

