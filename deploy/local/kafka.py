"""Apache Kafka: a single-node KRaft broker+controller, jars resolved from Maven Central, with
SASL_SSL (SCRAM-SHA-512) for clients, TLS from labbus's local CA, and ACLs (StandardAuthorizer)
derived from events/access.py."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
import uuid
from pathlib import Path

from labbus.deploy.local import proc
from labbus.deploy.local.proc import Echo, ServiceError
from labbus.events import access, kafka, pki
from labbus.events.config import Config

NAME = "kafka"
SETTING = "kafka_bootstrap"
STOP_SIGNAL = signal.SIGTERM
STOP_TIMEOUT = 60.0
START_TIMEOUT = 90.0
POM = Path(__file__).resolve().parent / "maven" / "kafka-pom.xml"
HEAP = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC"]
MECHANISM = "SCRAM-SHA-512"
# PBKDF2 rounds of the SCRAM users: Kafka's minimum (ScramMechanism.minIterations), which is also
# its default; each client connection makes the broker and the client hash this many rounds
SCRAM_ITERATIONS = 4096

LOG4J2_YAML = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


def _dir(cfg: Config) -> Path:
    return cfg.home / "kafka"


def _lib(cfg: Config) -> Path:
    return _dir(cfg) / "lib"


def _data(cfg: Config) -> Path:
    return _dir(cfg) / "data"


def _properties(cfg: Config) -> Path:
    return _dir(cfg) / "config" / "server.properties"


def _log4j(cfg: Config) -> Path:
    return _dir(cfg) / "config" / "log4j2.yaml"


def pid_file(cfg: Config) -> Path:
    """Written by us at start; removed by `down`."""
    return _dir(cfg) / "kafka.pid"


def log_path(cfg: Config) -> Path:
    return _dir(cfg) / "kafka.log"


def marker(cfg: Config) -> str:
    return str(_properties(cfg))


def endpoint(cfg: Config) -> tuple[str, int]:
    return proc.host_port(cfg.kafka_bootstrap, 9092)


def address(cfg: Config) -> str:
    return cfg.kafka_bootstrap


def running_pid(cfg: Config) -> int | None:
    return proc.read_pid(pid_file(cfg), marker(cfg))


def version() -> str:
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert found, f"no <kafka.version> in {POM}"
    return found.group(1).strip()


# --- install ----------------------------------------------------------------

def _java() -> str:
    java = shutil.which("java")
    hint = "install Java 17 or newer (Debian: apt-get install openjdk-17-jre-headless)"
    if java is None:
        raise ServiceError(NAME, f"java not found on PATH: {hint}")
    out = proc.run(NAME, [java, "-version"], hint=hint, timeout=60)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):  # "1.8.0" style
        major = int(found.group(2))
    if major < 17:
        raise ServiceError(NAME, f"{java} is Java {major or 'of unknown version'}; "
                                 f"Kafka {version()} needs Java 17 or newer: {hint}")
    return java


def _install_stamp() -> str:
    return f"kafka {version()} pom-sha256 {hashlib.sha256(POM.read_bytes()).hexdigest()}\n"


def _install(cfg: Config, echo: Echo) -> None:
    lib, stamp_file = _lib(cfg), _lib(cfg) / ".labbus-installed"
    stamp = _install_stamp()
    with contextlib.suppress(OSError):
        if stamp_file.read_text() == stamp:
            return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(NAME, "Maven (mvn) not found on PATH; it fetches the Kafka jars once: "
                                 "install Maven (Debian: apt-get install maven), or set "
                                 "LABBUS_KAFKA_BOOTSTRAP to a broker you run yourself")
    echo(f"kafka: fetching Apache Kafka {version()} jars with Maven into {lib} (first run only)")
    tmp = lib.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc.run(NAME, [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"],
             hint="check network access to Maven Central "
                  "(or your ~/.m2/settings.xml mirror) and retry",
             timeout=1800)
    if not any(tmp.glob("kafka_*.jar")):
        raise ServiceError(NAME, f"Maven finished but {tmp} holds no kafka_*.jar; check {POM}")
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    stamp_file.write_text(stamp)


def _security(cfg: Config) -> Path:
    return _dir(cfg) / "security"


def _pending_path(cfg: Config) -> Path:
    return _security(cfg) / "scram-pending.json"


def _pending(cfg: Config) -> set[str]:
    """Principals whose SCRAM credentials the broker's metadata does not hold yet."""
    try:
        return set(json.loads(_pending_path(cfg).read_text()))
    except FileNotFoundError:
        return set()


def _set_pending(cfg: Config, principals: set[str]) -> None:
    if principals:
        _pending_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        _pending_path(cfg).write_text(json.dumps(sorted(principals)))
    else:
        _pending_path(cfg).unlink(missing_ok=True)


def _formatted(cfg: Config) -> bool:
    return (_data(cfg) / "meta.properties").exists()


def _credentials(cfg: Config) -> access.LocalCredentials:
    """The local broker's credentials: kept once made, a password generated for any principal
    new to them. A new principal of a broker whose storage is already formatted (a principal
    labbus added since, or every principal of an older labbus's PLAINTEXT broker) is recorded
    as pending (before the password is written): `_register` adds its SCRAM user."""
    creds = access.read_credentials(cfg.home)
    keystore, ca = _security(cfg) / "broker-keystore.pem", _security(cfg) / "ca.pem"
    if not (keystore.exists() and ca.exists()):
        host, _ = endpoint(cfg)
        pki.init_ca(cfg.pki_dir)  # kept when it exists: the device CA signs the broker too
        pki.issue_kafka_cert(cfg.pki_dir, _security(cfg), (host,))
    passwords = dict(creds.passwords) if creds else {}
    new = {p for p in access.PRINCIPALS if p not in passwords}
    for principal in sorted(new):
        passwords[principal] = secrets.token_hex(24)
    if new and _formatted(cfg):
        _set_pending(cfg, _pending(cfg) | new)
    fresh = access.LocalCredentials(cfg.kafka_bootstrap, MECHANISM, ca, passwords)
    if fresh != creds:
        access.write_credentials(cfg.home, fresh)
    return fresh


def _write_config(cfg: Config, creds: access.LocalCredentials) -> None:
    """SASL_SSL (SCRAM-SHA-512) for clients, mutual TLS for the controller, ACLs enforced.

    The controller listener (port + 1, loopback) is not for clients: only this node's broker
    connects to it, with its own certificate (mutual TLS, principal labbus-kafka, a super
    user); SCRAM is not offered there because KRaft controllers cannot use SCRAM for their own
    listener (the credentials live in the metadata the controller serves), and a PLAINTEXT
    controller would make every local process that reaches it the ANONYMOUS super user the
    StandardAuthorizer then needs."""
    host, port = endpoint(cfg)
    sec = _security(cfg)
    admin_password = creds.passwords[access.ADMIN]
    props = f"""\
# Written by deploy/local/kafka.py on every start; edit that file, not this one.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={host}:{port + 1}
listeners=SASL_SSL://{host}:{port},CONTROLLER://{host}:{port + 1}
advertised.listeners=SASL_SSL://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:SSL,SASL_SSL:SASL_SSL
inter.broker.listener.name=SASL_SSL
# clients: SCRAM-SHA-512 over TLS; the broker's own connections to itself as admin
sasl.enabled.mechanisms={MECHANISM}
sasl.mechanism.inter.broker.protocol={MECHANISM}
listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{access.ADMIN}" password="{admin_password}";
# TLS: the certificate from labbus's local CA (events/pki.py), PEM files
ssl.keystore.type=PEM
ssl.keystore.location={sec / "broker-keystore.pem"}
ssl.truststore.type=PEM
ssl.truststore.location={sec / "ca.pem"}
listener.name.controller.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+),.*$/$1/,DEFAULT
# ACLs (events/access.py): nothing is allowed without one
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{access.ADMIN};User:{pki.KAFKA_BROKER_CN}
log.dirs={_data(cfg)}
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# One broker: 50 partitions per internal topic (the default) only slow down every restart.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1
"""
    path = _properties(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a password
    with os.fdopen(fd, "w") as f:
        f.write(props)
    os.chmod(path, 0o600)
    _log4j(cfg).write_text(LOG4J2_YAML)


def _cluster_id() -> str:
    """A Kafka Uuid string (what `StorageTool random-uuid` prints), without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _java_cmd(cfg: Config, java: str, *jvm_options: str) -> list[str]:
    return [java, *jvm_options, f"-Dlog4j2.configurationFile={_log4j(cfg)}",
            "-cp", f"{_lib(cfg)}/*"]


def _older(cfg: Config) -> bool:
    """Whether the broker's storage was formatted by a labbus without SASL_SSL and ACLs (no
    credentials next to it: its clients spoke PLAINTEXT and it holds no SCRAM user)."""
    return _formatted(cfg) and access.read_credentials(cfg.home) is None


def _format(cfg: Config, java: str, creds: access.LocalCredentials, echo: Echo) -> None:
    echo(f"kafka: formatting storage in {_data(cfg)} (SCRAM users: "
         f"{', '.join(access.PRINCIPALS)})")
    scram = [arg for principal in access.PRINCIPALS for arg in (
        "--add-scram", f"{MECHANISM}=[name={principal},password={creds.passwords[principal]},"
                       f"iterations={SCRAM_ITERATIONS}]")]
    proc.run(NAME, [*_java_cmd(cfg, java, "-Xmx256m"), "kafka.tools.StorageTool", "format",
                    "-t", _cluster_id(), "-c", str(_properties(cfg)), "--standalone", *scram],
             hint=f"fix the problem above, or remove {_data(cfg)} to start from empty storage",
             timeout=120)
    _set_pending(cfg, set())


def prepare(cfg: Config, echo: Echo) -> None:
    java = _java()
    _install(cfg, echo)
    if _older(cfg):
        echo(f"kafka: the broker's storage in {_data(cfg)} comes from a labbus without SASL_SSL "
             "and ACLs: upgrading it in place (its topics and offsets stay; the SCRAM users are "
             "added over the controller listener once it runs)")
    creds = _credentials(cfg)
    _write_config(cfg, creds)
    if not _formatted(cfg):
        _format(cfg, java, creds, echo)


def restart_reason(cfg: Config) -> str | None:
    """Why a broker running from this home must be restarted by `up` (None: it need not be):
    an older labbus started it with a PLAINTEXT listener and no authorizer."""
    try:
        props = _properties(cfg).read_text()
    except OSError:
        return None
    if "SASL_SSL://" not in props or access.read_credentials(cfg.home) is None:
        return ("an older labbus started it without SASL_SSL and ACLs (PLAINTEXT: anyone who "
                "reaches it may write anything)")
    return None


def start(cfg: Config, echo: Echo) -> int:
    java = shutil.which("java") or "java"
    argv = [*_java_cmd(cfg, java, *HEAP), "kafka.Kafka", str(_properties(cfg))]
    echo(f"kafka: starting broker on {cfg.kafka_bootstrap} (log: {log_path(cfg)})")
    pid = proc.spawn(argv, log=log_path(cfg), pid_file=pid_file(cfg), cwd=_dir(cfg))
    if not _pending(cfg):
        return pid
    try:
        _register(cfg, echo, pid)
        return pid
    except ServiceError as exc:
        # the old storage cannot be upgraded (or the broker does not start on it): keep it
        # aside, start from empty storage; dev data, lost but not deleted, and said so
        proc.stop(pid, sig=STOP_SIGNAL, timeout=STOP_TIMEOUT, marker=marker(cfg),
                  pid_file=pid_file(cfg))
        aside = _data(cfg).with_name(f"data.before-sasl-{time.strftime('%Y%m%d-%H%M%S')}")
        _data(cfg).rename(aside)
        echo(f"kafka: could not add the SCRAM users to the existing storage ({exc}); moved it "
             f"to {aside} (its topics are not on the new broker; delete that directory when "
             "you no longer need it) and starting from empty storage")
        _format(cfg, _java(), _credentials(cfg), echo)
        echo(f"kafka: starting broker on {cfg.kafka_bootstrap} (log: {log_path(cfg)})")
        return proc.spawn(argv, log=log_path(cfg), pid_file=pid_file(cfg), cwd=_dir(cfg))


# --- SCRAM users of a formatted broker -------------------------------------------------------
# `kafka-storage format --add-scram` only works on empty storage. A broker formatted earlier
# gets its users through AlterUserScramCredentials (what `kafka-configs --alter --add-config
# SCRAM-SHA-512=...` sends), here over the controller listener as the broker's own certificate
# (mutual TLS, a super user): the SASL_SSL listener cannot be used before its admin exists.
# aiokafka has no such request; its protocol module defines the wire format below.

def _scram_requests():
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import (
        CompactArray,
        CompactBytes,
        CompactString,
        Int8,
        Int16,
        Int32,
        Schema,
        TaggedFields,
    )

    class AlterUserScramCredentialsResponse_v0(Response):  # noqa: N801 - Kafka's names
        API_KEY, API_VERSION = 51, 0
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            ("results", CompactArray(("user", CompactString("utf-8")), ("error_code", Int16),
                                     ("error_message", CompactString("utf-8")),
                                     ("tags", TaggedFields))),
            ("tags", TaggedFields))

    class AlterUserScramCredentialsRequest_v0(RequestStruct):  # noqa: N801
        FLEXIBLE_VERSION = True
        API_KEY, API_VERSION = 51, 0
        RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
        SCHEMA = Schema(
            ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8),
                                       ("tags", TaggedFields))),
            ("upsertions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8),
                                        ("iterations", Int32), ("salt", CompactBytes),
                                        ("salted_password", CompactBytes),
                                        ("tags", TaggedFields))),
            ("tags", TaggedFields))

    class AlterUserScramCredentialsRequest(Request[AlterUserScramCredentialsRequest_v0]):
        API_KEY = 51

        def __init__(self, upsertions: list[tuple]) -> None:
            self.upsertions = upsertions

        def build(self, struct):
            return struct([], self.upsertions, {})

    return AlterUserScramCredentialsRequest


def scram_upsertion(name: str, password: str, iterations: int = SCRAM_ITERATIONS,
                    salt: bytes | None = None) -> tuple:
    """One SCRAM-SHA-512 user as AlterUserScramCredentials carries it: the salted password
    (RFC 5802 Hi(): PBKDF2-HMAC-SHA-512), never the password itself."""
    salt = salt if salt is not None else secrets.token_bytes(32)
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (name, 2, iterations, salt, salted, {})  # 2 = SCRAM-SHA-512 in Kafka's enum


async def _alter_scram(cfg: Config, users: dict[str, str], timeout: float) -> None:
    import asyncio
    import ssl

    from aiokafka.conn import create_conn

    host, port = endpoint(cfg)
    context = ssl.create_default_context(cafile=str(_security(cfg) / "ca.pem"))
    context.load_cert_chain(str(_security(cfg) / "broker-keystore.pem"))
    conn = await asyncio.wait_for(create_conn(
        host, port + 1, ssl_context=context, security_protocol="SSL",
        request_timeout_ms=int(timeout * 1000)), timeout)
    try:
        request = _scram_requests()([scram_upsertion(n, p) for n, p in sorted(users.items())])
        response = await asyncio.wait_for(conn.send(request), timeout)
    finally:
        conn.close()
    failed = [f"{user}: {code} {message}" for user, code, message, _ in response.results if code]
    if failed:
        raise ConnectionError("AlterUserScramCredentials refused: " + "; ".join(failed))


def _register(cfg: Config, echo: Echo, pid: int | None = None) -> None:
    """Add the pending principals' SCRAM users to the running broker (waits for its controller
    listener, up to START_TIMEOUT; raises ServiceError)."""
    pending = _pending(cfg)
    creds = access.read_credentials(cfg.home)
    users = {p: creds.passwords[p] for p in pending}
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a broker still starting makes aiokafka log errors

    def attempt() -> str | None:
        try:
            proc.run_async(lambda: _alter_scram(cfg, users, 10.0))
            return None
        except Exception as e:  # noqa: BLE001 - reported by wait_until on timeout
            return f"{type(e).__name__}: {e}"

    try:
        waited = proc.wait_until(NAME, "the controller listener (SCRAM users)", attempt,
                                 START_TIMEOUT, pid=pid, marker=marker(cfg), log=log_path(cfg))
    finally:
        quiet.setLevel(level)
    _set_pending(cfg, set())
    echo(f"kafka: added SCRAM users {', '.join(sorted(users))} ({waited:.1f} s)")


# --- health ------------------------------------------------------------------

def admin_cfg(cfg: Config) -> Config:
    """cfg acting as the local admin principal (topics, ACLs, health checks)."""
    return dataclasses.replace(cfg, kafka_principal=access.ADMIN)


async def _list_topics(cfg: Config, timeout: float) -> None:
    import asyncio

    admin = kafka.admin(cfg, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.list_topics(), timeout)
    finally:
        await admin.close()


def problem(cfg: Config, timeout: float = 5.0) -> str | None:
    """None when a TCP connect succeeds and the admin API lists topics, else what went wrong."""
    hosts = [proc.host_port(part, 9092) for part in cfg.kafka_bootstrap.split(",")]
    if not any(proc.port_open(h, p) for h, p in hosts):
        return "connection refused"
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a broker still starting makes aiokafka log errors
    try:
        proc.run_async(lambda: _list_topics(admin_cfg(cfg), timeout))
        return None
    except Exception as e:
        return f"listing topics failed: {type(e).__name__}: {e}"
    finally:
        quiet.setLevel(level)


def provision(cfg: Config, echo: Echo) -> None:
    """The SCRAM users of principals new since the broker started (kept running), the catalog's
    topics and the ACLs of the namespace (events/access.py), as admin."""
    if restart_reason(cfg) is None:  # not an older labbus's broker left running (PLAINTEXT)
        _credentials(cfg)
        if _pending(cfg):
            _register(cfg, echo)
    created = proc.run_async(lambda: kafka.ensure_topics(admin_cfg(cfg)))
    if created:
        echo(f"kafka: created topics {', '.join(created)}")
