"""Who may write where on the bus: one Kafka principal per process kind and its ACLs, as data.

`ACCESS` is the one table; the broker's ACLs (`labbus kafka acls`, `labbus services up`, the
tests' namespaces) are derived from it by `bindings(namespace)` and nothing else grants rights.
Topics are named by the catalog (events/topics.py) and consumer groups by `group_id`, so a
namespace (LABBUS_NAMESPACE) gets its own literal ACLs: `ns.lab.devices`, group
`ns.labbus.validator`, faust's internal topics under the prefix `ns.labbus.validator-`.

    principal            kind        reads                        writes
    agent-sim            agent       -                            its devices' registrations, raw
                                                                  readings
    agent-ot2 ...        agent       what it acts on              its own topics (+ dead letters)
    validator ...        processor   its inputs                   its outputs, its group, its
                                                                  faust changelogs (+ dead letters)
    projector-*          projector   its inputs, its group        dead letters only (the runtime's
                                                                  policy for undecodable input)
    operator             operator    lab.commands, lab.experiments  the same (`labbus command send`,
                                                                  `labbus experiment start`)
    gateway-http         agent       -                            lab.commands, lab.experiments
                                                                  (its POST routes), lab.users
                                                                  (AccessDenied)
    user-admin           operator    -                            lab.users (`labbus users add`...)
    webhooks             processor   the topics of the event      lab.webhooks (+ dead letters),
                                     types it may forward         one group per target
    admin                super user  everything (services up, topic creation, ACLs, the tests)

The query API has no principal: it never talks to Kafka (`Config.kafka_principal` is "" there).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from labbus.events.config import Config, ConfigError
from labbus.events.topics import (
    ALERTS,
    COLOUR_READINGS,
    COMMANDS,
    DEAD_LETTER,
    DEVICE_CHANGES,
    DEVICE_REJECTED,
    DEVICE_STATUS,
    DEVICES,
    EXPERIMENTS,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    QUOTA_INBOX,
    REPORTS_INBOX,
    ROBOT_RUNS,
    TESTING_EXECUTIONS,
    TESTING_INBOX,
    TESTING_REQUESTS,
    TESTING_SAMPLES,
    USERS,
    WEBHOOKS,
    TopicSpec,
    group_id,
    topic_name,
)

ADMIN = "admin"


@dataclass(frozen=True)
class Access:
    """What one principal may do. `groups` are process names of its consumer groups
    (`group_id(cfg, name)`; a name ending in "." is a prefix, e.g. one group per SiLA device);
    `internal` names faust apps whose internal topics (changelogs, `<app id>-...`) it owns."""
    principal: str
    kind: str  # agent, processor, projector, operator
    commands: tuple[str, ...]  # the `labbus` commands that run as this principal
    reads: tuple[TopicSpec, ...] = ()
    writes: tuple[TopicSpec, ...] = ()
    groups: tuple[str, ...] = ()
    internal: tuple[str, ...] = ()


ACCESS: tuple[Access, ...] = (
    Access("agent-sim", "agent", ("agent sim",),
           writes=(DEVICES, MEASUREMENTS_RECORDED)),
    Access("gateway-grpc", "agent", ("gateway grpc",),
           reads=(DEVICES, COMMANDS),
           writes=(DEVICES, DEVICE_CHANGES, DEVICE_STATUS, DEVICE_REJECTED, COMMANDS,
                   MEASUREMENTS_RECORDED)),
    Access("agent-sila2", "agent", ("agent sila2",),
           reads=(DEVICES, COMMANDS),
           writes=(DEVICES, DEVICE_CHANGES, DEVICE_STATUS, MEASUREMENTS_RECORDED, COMMANDS,
                   DEAD_LETTER),
           groups=("agent-sila2.",)),
    Access("agent-ot2", "agent", ("agent ot2",),
           reads=(ROBOT_RUNS,), writes=(ROBOT_RUNS, DEAD_LETTER), groups=("agent-ot2",)),
    Access("agent-reader", "agent", ("agent reader",),
           reads=(ROBOT_RUNS,), writes=(COLOUR_READINGS, DEAD_LETTER), groups=("agent-reader",)),
    Access("validator", "processor", ("process validate",),
           reads=(MEASUREMENTS_RECORDED, DEVICES),
           writes=(MEASUREMENTS_VALIDATED, MEASUREMENTS_REJECTED, DEAD_LETTER),
           groups=("validator",), internal=("validator",)),
    Access("experiment", "processor", ("process experiment",),
           reads=(EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS),
           writes=(EXPERIMENTS, ROBOT_RUNS, DEAD_LETTER),
           groups=("experiment",), internal=("experiment",)),
    Access("devices", "processor", ("process devices",),
           reads=(DEVICE_STATUS, COMMANDS, DEVICES),
           writes=(COMMANDS, DEVICE_STATUS, DEAD_LETTER),
           groups=("devices",), internal=("devices",)),
    Access("anomalies", "processor", ("process anomalies",),
           reads=(MEASUREMENTS_VALIDATED,), writes=(ALERTS, DEAD_LETTER),
           groups=("anomalies",), internal=("anomalies",)),
    Access("projector-postgres", "projector", ("project postgres",),
           reads=(DEVICES, MEASUREMENTS_VALIDATED, EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS,
                  DEVICE_STATUS, COMMANDS, ALERTS, USERS, TESTING_REQUESTS, TESTING_EXECUTIONS,
                  TESTING_SAMPLES),
           writes=(DEAD_LETTER,), groups=("projector.postgres",)),
    Access("projector-mongo", "projector", ("project mongo",),
           reads=(DEVICES, MEASUREMENTS_VALIDATED, EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS),
           writes=(DEAD_LETTER,), groups=("projector.mongo",)),
    Access("quota", "processor", ("process quota",),
           reads=(USERS, EXPERIMENTS, QUOTA_INBOX), writes=(QUOTA_INBOX, EXPERIMENTS, DEAD_LETTER),
           groups=("quota",), internal=("quota",)),
    # test protocols (issue 11): executions keyed by execution id; the command events and
    # readings of an execution reach it re-keyed through lab.testing.inbox (processors/testing.py);
    # it reads the registrations of devices and samples in full (a View)
    Access("testing", "processor", ("process testing",),
           reads=(TESTING_REQUESTS, TESTING_EXECUTIONS, TESTING_INBOX, COMMANDS,
                  MEASUREMENTS_RECORDED, DEVICES, TESTING_SAMPLES),
           writes=(TESTING_REQUESTS, TESTING_EXECUTIONS, TESTING_INBOX, COMMANDS, DEAD_LETTER),
           groups=("testing",), internal=("testing",)),
    # reports of completed service requests: the execution events re-keyed by request id
    # through lab.reports.inbox (processors/report_gen.py); ReportGenerated on lab.testing.requests
    Access("reports", "processor", ("process reports",),
           reads=(TESTING_REQUESTS, TESTING_EXECUTIONS, REPORTS_INBOX),
           writes=(TESTING_REQUESTS, REPORTS_INBOX, DEAD_LETTER),
           groups=("reports",), internal=("reports",)),
    # the simulated PV instruments: one consumer group per device, as the SiLA 2 bridge
    Access("agent-pv", "agent", ("agent pv",),
           reads=(COMMANDS,),
           writes=(DEVICES, DEVICE_STATUS, COMMANDS, MEASUREMENTS_RECORDED, DEAD_LETTER),
           groups=("agent-pv.",)),
    Access("operator", "operator",
           ("command send", "experiment start", "experiment cancel", "experiment watch",
            "testing submit", "testing watch", "testing inspect", "testing abort",
            "samples register"),
           reads=(COMMANDS, EXPERIMENTS, TESTING_REQUESTS),
           writes=(COMMANDS, EXPERIMENTS, TESTING_REQUESTS, TESTING_EXECUTIONS,
                   TESTING_SAMPLES)),
    # POST /commands, /experiments, /experiments/{id}/cancel, /service-requests (and their
    # inspections), /executions/{id}/abort, /samples; every 403 as AccessDenied
    Access("gateway-http", "agent", ("gateway http",),
           writes=(COMMANDS, EXPERIMENTS, USERS, TESTING_REQUESTS, TESTING_EXECUTIONS,
                   TESTING_SAMPLES)),
    Access("user-admin", "operator",
           ("users add", "users grant", "users revoke", "users disable", "users quota"),
           writes=(USERS,)),
    # outbound webhooks: one consumer group per target (`labbus.webhooks.<target>`). It may read
    # the topics of the event types a target can subscribe to (device, command, alert, campaign,
    # robot and test-protocol events: non-conformances to a QMS, results to a LIMS, request
    # status to a tracker); not the high-volume reading streams, not lab.users (e-mail addresses),
    # not its own lab.webhooks (a target fed its own deliveries would never stop)
    Access("webhooks", "processor", ("webhooks",),
           reads=(DEVICES, DEVICE_STATUS, DEVICE_REJECTED, COMMANDS, ALERTS,
                  MEASUREMENTS_REJECTED, EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS,
                  TESTING_REQUESTS, TESTING_EXECUTIONS, TESTING_SAMPLES),
           writes=(WEBHOOKS, DEAD_LETTER), groups=("webhooks.",)),
)

BY_PRINCIPAL: dict[str, Access] = {a.principal: a for a in ACCESS}
PRINCIPALS: tuple[str, ...] = (ADMIN, *BY_PRINCIPAL)


ADMIN_COMMANDS = ("services up", "services down", "services status", "topics create",
                  "kafka acls", "demo")


def principal_for_command(command: str) -> str | None:
    """The principal a `labbus` command (e.g. "agent ot2") runs as; None if it has none."""
    if command in ADMIN_COMMANDS:
        return ADMIN
    for a in ACCESS:
        if command in a.commands:
            return a.principal
    return None


def access(principal: str) -> Access:
    try:
        return BY_PRINCIPAL[principal]
    except KeyError:
        raise ConfigError(f"no Kafka principal {principal!r}; known: {', '.join(PRINCIPALS)}"
                          ) from None


def visible(principal: str) -> tuple[TopicSpec, ...]:
    """The catalog topics this principal may see (read or write); all of them for admin."""
    from labbus.events.topics import CATALOG

    if principal == ADMIN:
        return CATALOG
    a = access(principal)
    return tuple(s for s in CATALOG if s in a.reads or s in a.writes)


# --- ACL bindings ------------------------------------------------------------------------------
# Kafka's wire codes (org.apache.kafka.common.acl / resource)
TOPIC, GROUP = 2, 3
LITERAL, PREFIXED = 3, 4
READ, WRITE, CREATE, DESCRIBE, ALL = 3, 4, 5, 8, 2
ALLOW = 3
OPERATIONS = {ALL: "ALL", READ: "READ", WRITE: "WRITE", CREATE: "CREATE", DESCRIBE: "DESCRIBE"}


@dataclass(frozen=True, order=True)
class Binding:
    """One ACL: ALLOW `operation` on a resource to User:`principal` from any host."""
    resource_type: int
    name: str
    pattern: int
    principal: str
    operation: int

    def describe(self) -> str:
        kind = {TOPIC: "topic", GROUP: "group"}[self.resource_type]
        how = "prefix" if self.pattern == PREFIXED else "literal"
        return (f"User:{self.principal:19} {OPERATIONS[self.operation]:8} {kind} "
                f"{self.name}{'*' if self.pattern == PREFIXED else ''} ({how})")


def bindings(cfg: Config) -> list[Binding]:
    """Every ACL of cfg's namespace, derived from ACCESS. Topic WRITE and READ imply DESCRIBE."""
    out: set[Binding] = set()
    for a in ACCESS:
        for spec in a.reads:
            out.add(Binding(TOPIC, topic_name(cfg, spec), LITERAL, a.principal, READ))
        for spec in a.writes:
            out.add(Binding(TOPIC, topic_name(cfg, spec), LITERAL, a.principal, WRITE))
        for name in a.groups:
            pattern = PREFIXED if name.endswith(".") else LITERAL
            out.add(Binding(GROUP, group_id(cfg, name), pattern, a.principal, READ))
        for app in a.internal:
            # faust's changelog topics and the app's own group: created, written, read by it
            out.add(Binding(TOPIC, group_id(cfg, app) + "-", PREFIXED, a.principal, ALL))
    return sorted(out)


def namespace_resources(cfg: Config, names: list[str]) -> list[str]:
    """Of these ACL resource names, those that belong to cfg's namespace."""
    if not cfg.namespace:
        raise ValueError("the empty (production) namespace is not removed this way")
    return [n for n in names if n.startswith(cfg.namespace + ".")]


# --- local credentials -------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalCredentials:
    """What `labbus services up` wrote for its broker: the address it listens on, the SASL
    mechanism, the CA its certificate chains to and one password per principal."""
    bootstrap: str
    mechanism: str
    ca_file: Path
    passwords: dict[str, str]


def credentials_path(home: Path) -> Path:
    return home / "kafka" / "security" / "credentials.json"


def write_credentials(home: Path, creds: LocalCredentials) -> Path:
    path = credentials_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    data = {"bootstrap": creds.bootstrap, "mechanism": creds.mechanism,
            "ca_file": str(creds.ca_file), "passwords": creds.passwords}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    tmp.replace(path)
    return path


def read_credentials(home: Path) -> LocalCredentials | None:
    path = credentials_path(home)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the local Kafka credentials {path}: {exc}") from None
    return LocalCredentials(data["bootstrap"], data["mechanism"], Path(data["ca_file"]),
                            dict(data["passwords"]))


def local_credentials(cfg: Config) -> LocalCredentials | None:
    """The local broker's credentials when cfg's bootstrap is that broker, else None."""
    creds = read_credentials(cfg.home)
    if creds is None or creds.bootstrap != cfg.kafka_bootstrap:
        return None
    return creds
