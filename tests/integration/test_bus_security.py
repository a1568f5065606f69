"""The bus checks who writes where (README "The bus: who may write where"), on the real broker of
`labbus services up`: SASL_SSL with SCRAM-SHA-512, TLS from the local CA, ACLs per principal
derived from events/access.py. Each test acts as one principal of the session's namespace."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import uuid

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from labbus.deploy.local import proc
from labbus.events import access, kafka
from labbus.events.topics import (
    ALERTS,
    DEAD_LETTER,
    DEVICES,
    EXPERIMENTS,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_VALIDATED,
    topic_name,
)
from tests.conftest import run


@pytest.fixture(scope="module")
def cfg(cfg):
    """A namespace of this module's own: the probes below write bytes that are no events, which
    must not reach the session's topics other tests decode."""
    mine = dataclasses.replace(cfg, namespace=cfg.namespace + "-acl")
    yield mine
    run(kafka.delete_namespace_topics(mine, mine.namespace))  # and, as admin, its ACLs


@pytest.fixture(scope="module")
def local(cfg):
    creds = access.local_credentials(cfg)
    if creds is None:
        pytest.skip("the broker is not the local one of `labbus services up` (no local "
                    "credentials for LABBUS_KAFKA_BOOTSTRAP)")
    run(kafka.ensure_topics(cfg))  # the namespace's topics and ACLs, as admin
    return creds


def as_(cfg, principal: str, **changes):
    return dataclasses.replace(cfg, kafka_principal=principal, **changes)


async def _produce(cfg, topic: str) -> None:
    producer = kafka.producer(cfg, request_timeout_ms=10_000)
    try:
        await producer.start()
        await producer.send_and_wait(topic, b"acl-probe-" + uuid.uuid4().hex.encode(),
                                     key=b"acl-probe")
    finally:
        await producer.stop()


def test_an_agent_writing_to_lab_experiments_gets_a_topic_authorization_error(cfg, local):
    ot2 = as_(cfg, "agent-ot2")
    with pytest.raises(TopicAuthorizationFailedError):
        run(asyncio.wait_for(_produce(ot2, topic_name(cfg, EXPERIMENTS)), 30))
    sim = as_(cfg, "agent-sim")
    with pytest.raises(TopicAuthorizationFailedError):
        run(asyncio.wait_for(_produce(sim, topic_name(cfg, EXPERIMENTS)), 30))


def test_an_agent_writes_its_own_topic(cfg, local):
    run(asyncio.wait_for(_produce(as_(cfg, "agent-sim"), topic_name(cfg, DEVICES)), 30))


def test_a_projector_cannot_write(cfg, local):
    projector = as_(cfg, "projector-postgres")
    for spec in (MEASUREMENTS_VALIDATED, DEVICES, EXPERIMENTS):
        with pytest.raises(TopicAuthorizationFailedError):
            run(asyncio.wait_for(_produce(projector, topic_name(cfg, spec)), 30))


def test_a_processor_writes_its_outputs_but_not_others(cfg, local):
    anomalies = as_(cfg, "anomalies")
    run(asyncio.wait_for(_produce(anomalies, topic_name(cfg, ALERTS)), 30))
    run(asyncio.wait_for(_produce(anomalies, topic_name(cfg, DEAD_LETTER)), 30))
    with pytest.raises(TopicAuthorizationFailedError):
        run(asyncio.wait_for(_produce(anomalies, topic_name(cfg, MEASUREMENTS_VALIDATED)), 30))


def test_a_principal_reads_only_its_inputs_and_joins_only_its_groups(cfg, local):
    from labbus.events.topics import group_id

    async def read(c, topic: str, group: str | None) -> None:
        consumer = kafka.consumer(c, topic, group=group, request_timeout_ms=10_000)
        await consumer.start()
        try:
            await asyncio.wait_for(consumer.getmany(timeout_ms=2000), 20)
            if group is not None:
                await consumer.commit({TopicPartition(topic, 0): 0})
        finally:
            await consumer.stop()

    reader = as_(cfg, "agent-reader")
    with pytest.raises(TopicAuthorizationFailedError):
        run(read(reader, topic_name(cfg, MEASUREMENTS_RECORDED), None))
    with pytest.raises((GroupAuthorizationFailedError, KafkaError)):
        run(read(reader, topic_name(cfg, DEVICES), group_id(cfg, "validator")))


def test_a_wrong_password_is_refused(cfg, local):
    wrong = as_(cfg, "operator", kafka_username="operator", kafka_password="not-the-password")
    assert kafka.security(wrong).password == "not-the-password"
    with pytest.raises(KafkaError) as raised:  # aiokafka: authentication failed, no connection
        run(asyncio.wait_for(_produce(wrong, topic_name(cfg, EXPERIMENTS)), 30))
    assert not isinstance(raised.value, TopicAuthorizationFailedError)
    nobody = as_(cfg, "operator", kafka_username="nobody", kafka_password="x")
    with pytest.raises(KafkaError):
        run(asyncio.wait_for(_produce(nobody, topic_name(cfg, EXPERIMENTS)), 30))


def test_plaintext_connections_to_the_client_port_are_refused(cfg, local):
    plain = as_(cfg, "admin", kafka_security_protocol="PLAINTEXT")
    assert kafka.security(plain).protocol == "PLAINTEXT"

    async def connect() -> None:
        admin = kafka.admin(plain, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(admin.start(), 20)
        finally:
            await admin.close()

    with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
        run(connect())
    # the raw protocol too: an ApiVersions request (correlation id 1) in plain text gets no
    # Kafka response, only the connection closed or a TLS alert
    host, port = proc.host_port(cfg.kafka_bootstrap, 9092)
    request = bytes.fromhex("00000012" "0012" "0000" "00000001" "0008") + b"plaintxt"
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        s.settimeout(5)
        try:
            answer = s.recv(64)
        except (TimeoutError, ConnectionResetError):
            answer = b""
    assert answer[4:8] != bytes.fromhex("00000001"), answer


def test_tls_needs_the_local_ca(cfg, local):
    """A client that does not trust the local CA fails the handshake (the broker's certificate
    comes from the device CA)."""
    host, port = proc.host_port(cfg.kafka_bootstrap, 9092)
    context = ssl.create_default_context()  # the system's CAs only
    with socket.create_connection((host, port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname=host)
    trusting = ssl.create_default_context(cafile=str(local.ca_file))
    with socket.create_connection((host, port), timeout=5) as raw:
        with trusting.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_the_query_api_has_no_kafka_access(cfg):
    from labbus.events.config import ConfigError

    with pytest.raises(ConfigError, match="no Kafka access"):
        kafka.producer(as_(cfg, ""))
