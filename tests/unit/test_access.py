"""The bus's principals and ACLs (events/access.py) and how a client picks its credentials
(events/kafka.py `security`): plain functions over data, no broker."""

from __future__ import annotations

import dataclasses

import click
import pytest

from labbus.deploy.cli import main
from labbus.events import access, config, kafka
from labbus.events.access import ACCESS, LocalCredentials, bindings
from labbus.events.config import ConfigError
from labbus.events.topics import CATALOG, DEAD_LETTER, EXPERIMENTS, group_id, topic_name

# commands that never build a Kafka client
NO_KAFKA = {"config", "topics list", "api", "db partitions", "devices init-ca",
            "devices issue-cert", "agent sila2-sim", "users list",
            "login", "logout"}


def _leaves(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, path + " ")
        else:
            yield path


def test_every_command_has_a_principal_or_no_kafka_access():
    for command in _leaves(main):
        principal = access.principal_for_command(command)
        assert (principal is None) == (command in NO_KAFKA), command


def test_every_worker_process_runs_as_its_own_principal():
    from labbus.deploy.bootstrap import PROCESSES

    for name in PROCESSES:
        assert name in access.BY_PRINCIPAL, name


def test_only_the_processors_of_campaigns_and_the_entry_points_of_people_write_lab_experiments():
    writers = {a.principal for a in ACCESS if EXPERIMENTS in a.writes}
    assert writers == {"experiment", "quota", "operator", "gateway-http"}


def test_projectors_only_read_and_dead_letter():
    for a in ACCESS:
        if a.kind == "projector":
            assert a.writes == (DEAD_LETTER,) and a.reads and not a.internal


def test_bindings_are_literal_names_of_the_namespace():
    cfg = config.load({"LABBUS_NAMESPACE": "ns1"})
    found = bindings(cfg)
    names = {topic_name(cfg, s) for s in CATALOG}
    for b in found:
        assert b.name.startswith("ns1."), b
        if b.resource_type == access.TOPIC and b.pattern == access.LITERAL:
            assert b.name in names and b.operation in (access.READ, access.WRITE)
    assert access.Binding(access.TOPIC, "ns1.labbus.experiment-", access.PREFIXED,
                          "experiment", access.ALL) in found
    assert access.Binding(access.GROUP, group_id(cfg, "validator"), access.LITERAL,
                          "validator", access.READ) in found
    assert access.Binding(access.GROUP, "ns1.labbus.agent-sila2.", access.PREFIXED,
                          "agent-sila2", access.READ) in found
    # nobody but the admin (a super user, no ACL needed) creates catalog topics
    assert not any(b.operation == access.CREATE for b in found)


def test_agent_writes_are_their_own_topics():
    ot2 = {(b.name, b.operation) for b in bindings(config.load({}))
           if b.principal == "agent-ot2"}
    assert ot2 == {("lab.robot.runs", access.READ), ("lab.robot.runs", access.WRITE),
                   ("lab.deadletter", access.WRITE), ("labbus.agent-ot2", access.READ)}


def _local(tmp_path, bootstrap="127.0.0.1:19092"):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    access.write_credentials(tmp_path, LocalCredentials(
        bootstrap, "SCRAM-SHA-512", ca, {"admin": "pa", "agent-ot2": "pb"}))
    return ca


def test_local_credentials_pick_the_process_kinds_password(tmp_path):
    ca = _local(tmp_path)
    assert oct(access.credentials_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    cfg = dataclasses.replace(config.load({"LABBUS_HOME": str(tmp_path)}),
                              kafka_principal="agent-ot2")
    sec = kafka.security(cfg)
    assert (sec.protocol, sec.mechanism, sec.username, sec.password, sec.ca_file) == (
        "SASL_SSL", "SCRAM-SHA-512", "agent-ot2", "pb", ca)
    assert "pb" not in repr(sec)
    admin = kafka.security(config.load({"LABBUS_HOME": str(tmp_path)}))
    assert admin.username == "admin" and admin.password == "pa"
    with pytest.raises(ConfigError, match="no local Kafka credentials for principal 'validator'"):
        kafka.security(dataclasses.replace(cfg, kafka_principal="validator"))


def test_another_broker_does_not_get_the_local_credentials(tmp_path):
    _local(tmp_path)
    cfg = config.load({"LABBUS_HOME": str(tmp_path), "LABBUS_KAFKA_BOOTSTRAP": "kafka.lab:9092"})
    assert kafka.security(cfg) == kafka.Security()  # PLAINTEXT


def test_own_cluster_settings_come_from_the_environment(tmp_path):
    from labbus.events import pki

    ca = pki.init_ca(tmp_path / "corp").ca_cert
    cfg = config.load({"LABBUS_HOME": str(tmp_path), "LABBUS_KAFKA_BOOTSTRAP": "kafka.lab:9093",
                       "LABBUS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
                       "LABBUS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                       "LABBUS_KAFKA_USERNAME": "svc-labbus", "LABBUS_KAFKA_PASSWORD": "s3",
                       "LABBUS_KAFKA_CA_FILE": str(ca)})
    sec = kafka.security(cfg)
    assert (sec.protocol, sec.mechanism, sec.username, sec.password, sec.ca_file) == (
        "SASL_SSL", "SCRAM-SHA-256", "svc-labbus", "s3", ca)
    opts = sec.options()
    assert opts["security_protocol"] == "SASL_SSL" and opts["ssl_context"] is not None
    with pytest.raises(ConfigError, match="LABBUS_KAFKA_USERNAME"):
        kafka.security(config.load({"LABBUS_HOME": str(tmp_path),
                                    "LABBUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}))


@pytest.mark.parametrize("env, variable", [
    ({"LABBUS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "LABBUS_KAFKA_SECURITY_PROTOCOL"),
    ({"LABBUS_KAFKA_SASL_MECHANISM": "MD5"}, "LABBUS_KAFKA_SASL_MECHANISM"),
    ({"LABBUS_KAFKA_CA_FILE": "/nonexistent/ca.pem"}, "LABBUS_KAFKA_CA_FILE"),
])
def test_bad_security_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        config.load(env)


def test_the_api_has_no_kafka_access():
    assert access.principal_for_command("api") is None
    with pytest.raises(ConfigError, match="no Kafka access"):
        kafka.security(dataclasses.replace(config.load({}), kafka_principal=""))
