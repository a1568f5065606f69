"""Apache Kafka: a single-node KRaft broker+controller, jars resolved from Maven Central."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import shutil
import signal
import uuid
from pathlib import Path

from labbus.deploy.local import proc
from labbus.deploy.local.proc import Echo, ServiceError
from labbus.events.config import Config

NAME = "kafka"
SETTING = "kafka_bootstrap"
STOP_SIGNAL = signal.SIGTERM
STOP_TIMEOUT = 60.0
START_TIMEOUT = 90.0
POM = Path(__file__).resolve().parent / "maven" / "kafka-pom.xml"
HEAP = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC"]

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


def _write_config(cfg: Config) -> None:
    host, port = endpoint(cfg)
    props = f"""\
# Written by deploy/local/kafka.py on every start; edit that file, not this one.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={host}:{port + 1}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{port + 1}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
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
    _properties(cfg).parent.mkdir(parents=True, exist_ok=True)
    _properties(cfg).write_text(props)
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


def prepare(cfg: Config, echo: Echo) -> None:
    java = _java()
    _install(cfg, echo)
    _write_config(cfg)
    if not (_data(cfg) / "meta.properties").exists():
        echo(f"kafka: formatting storage in {_data(cfg)}")
        proc.run(NAME, [*_java_cmd(cfg, java, "-Xmx256m"), "kafka.tools.StorageTool", "format",
                        "-t", _cluster_id(), "-c", str(_properties(cfg)), "--standalone"],
                 hint=f"fix the problem above, or remove {_data(cfg)} to start from empty storage",
                 timeout=120)


def start(cfg: Config, echo: Echo) -> int:
    java = shutil.which("java") or "java"
    argv = [*_java_cmd(cfg, java, *HEAP), "kafka.Kafka", str(_properties(cfg))]
    echo(f"kafka: starting broker on {cfg.kafka_bootstrap} (log: {log_path(cfg)})")
    return proc.spawn(argv, log=log_path(cfg), pid_file=pid_file(cfg), cwd=_dir(cfg))


# --- health ------------------------------------------------------------------

async def _list_topics(bootstrap: str, timeout: float) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
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
        proc.run_async(lambda: _list_topics(cfg.kafka_bootstrap, timeout))
        return None
    except Exception as e:
        return f"listing topics failed: {type(e).__name__}: {e}"
    finally:
        quiet.setLevel(level)


def provision(cfg: Config, echo: Echo) -> None:
    """Nothing to create: topics are created by labbus itself (auto-create is off)."""
