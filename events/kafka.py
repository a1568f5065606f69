"""Kafka helpers: the one place Kafka clients are built (producer, consumer, admin; faust's
settings come from `security` too), topic creation and the ACLs of a namespace.

Every client authenticates as `security(cfg)` says: the SASL/TLS settings of the environment
(LABBUS_KAFKA_SECURITY_PROTOCOL, ..._SASL_MECHANISM, ..._USERNAME, ..._PASSWORD, ..._CA_FILE)
for a broker of your own, or, against the local broker of `labbus services up`, SASL_SSL with
the credentials of the process kind's principal (`cfg.kafka_principal`, events/access.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from labbus.events import access
from labbus.events.config import Config, ConfigError
from labbus.events.topics import CATALOG, TopicSpec, topic_for, topic_name

if TYPE_CHECKING:
    from labbus.events.model import Event

log = logging.getLogger(__name__)


# How long a closing TLS connection waits for the peer's close_notify (asyncio's and uvloop's
# ssl_shutdown_timeout, 30 s by default) before it is dropped. The Kafka broker does not always
# answer a client's close_notify (TLS 1.3 lets it keep its side open): a faust worker's consumer
# thread, closing a connection with a fetch and a ListOffsets still in flight, waited the whole
# 30 s, and faust's non-daemon thread kept the process alive that long after SIGTERM. The Kafka
# protocol needs no TLS goodbye (every request that matters was answered before the close), so
# a labbus process waits briefly for it and then lets the connection go.
TLS_CLOSE_TIMEOUT_S = 2.0


def install_event_loop() -> None:
    """Every labbus process's event loops (the main one, faust's consumer thread's, any other
    asyncio.new_event_loop()): uvloop (~15 % less CPU per event than asyncio's own loop), whose
    TLS connections wait at most TLS_CLOSE_TIMEOUT_S for the peer's close_notify."""
    import uvloop

    class Loop(uvloop.Loop):
        async def create_connection(self, *args, **kwargs):
            if kwargs.get("ssl") and kwargs.get("ssl_shutdown_timeout") is None:
                kwargs["ssl_shutdown_timeout"] = TLS_CLOSE_TIMEOUT_S
            return await super().create_connection(*args, **kwargs)

    class Policy(uvloop.EventLoopPolicy):
        def new_event_loop(self):
            return Loop()

    asyncio.set_event_loop_policy(Policy())


@dataclass(frozen=True)
class Security:
    """How a client authenticates: protocol, SASL mechanism/user/password, the CA to trust."""
    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    def __repr__(self) -> str:  # never the password
        return (f"Security({self.protocol}, {self.mechanism}, user={self.username}, "
                f"ca={self.ca_file})")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        return _ssl_context(self.ca_file) if self.tls else None

    def options(self) -> dict:
        """aiokafka's keyword arguments for this security."""
        opts: dict = {"security_protocol": self.protocol}
        if self.tls:
            opts["ssl_context"] = self.ssl_context()
        if self.sasl:
            opts.update(sasl_mechanism=self.mechanism, sasl_plain_username=self.username,
                        sasl_plain_password=self.password)
        return opts


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Server certificate and host name verified, against ca_file or the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def security(cfg: Config) -> Security:
    """The security settings of cfg's Kafka clients. Raises ConfigError naming the variable."""
    if cfg.kafka_principal == "":
        raise ConfigError("this process has no Kafka access (the query API never talks to Kafka)")
    local = access.local_credentials(cfg)
    protocol = cfg.kafka_security_protocol or ("SASL_SSL" if local else "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return Security()
    ca = cfg.kafka_ca_file or (local.ca_file if local else None)
    if not protocol.startswith("SASL_"):
        return Security(protocol, ca_file=ca)
    user = cfg.kafka_username or (cfg.kafka_principal if local else "")
    password = cfg.kafka_password
    if not password and local is not None:
        password = local.passwords.get(user, "")
        if not password:
            raise ConfigError(
                f"no local Kafka credentials for principal {user!r} in "
                f"{access.credentials_path(cfg.home)}; run `labbus services up` (or set "
                "LABBUS_KAFKA_USERNAME and LABBUS_KAFKA_PASSWORD)")
    if not user:
        raise ConfigError(f"LABBUS_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                          "LABBUS_KAFKA_USERNAME (and LABBUS_KAFKA_PASSWORD)")
    if not password:
        raise ConfigError(f"LABBUS_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                          f"LABBUS_KAFKA_PASSWORD (for LABBUS_KAFKA_USERNAME={user})")
    mechanism = cfg.kafka_sasl_mechanism if (cfg.explicitly_set("kafka_sasl_mechanism")
                                             or not local) else local.mechanism
    return Security(protocol, mechanism, user, password, ca)


def admin(cfg: Config, **overrides) -> AIOKafkaAdminClient:
    options = dict(bootstrap_servers=cfg.kafka_bootstrap, **security(cfg).options())
    options.update(overrides)
    return AIOKafkaAdminClient(**options)


def producer(cfg: Config, **overrides) -> AIOKafkaProducer:
    """acks=all and idempotence: a send that succeeded is on the broker exactly once."""
    options = dict(
        bootstrap_servers=cfg.kafka_bootstrap,
        **security(cfg).options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        compression_type=None,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(cfg: Config, *topics: str, group: str | None, **overrides) -> AIOKafkaConsumer:
    """Auto-commit off: each process commits only after its own work is durable. A process's
    group member (the consumer that subscribes) passes `group_instance_id=member(cfg)`."""
    options = dict(
        bootstrap_servers=cfg.kafka_bootstrap,
        **security(cfg).options(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
        fetch_max_wait_ms=100,
        # A member that dies without leaving the group (kill -9, a lost host) holds its
        # partitions until the broker has missed its heartbeats for the session timeout, so a
        # restarted process works again about that long after a crash. 10 s with a heartbeat
        # every 3 s (aiokafka's defaults, stated here so that they hold whatever its defaults
        # become; faust's are 60 s, see processors/validator.py) tolerates an event loop busy for
        # a few seconds on a loaded machine; the broker accepts 6 s to 30 min.
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def member(cfg: Config) -> str | None:
    """The static group-membership name (Kafka KIP-345) of this process's consumer-group
    members: LABBUS_GROUP_INSTANCE_ID, unique per process of a kind and stable across its
    restarts (a StatefulSet pod name, a systemd instance name). A member restarted under the
    same name after a crash gets its partitions back at once, without waiting for the dead
    one's 10 s session to expire; the price: a member stopped gracefully does not leave the
    group either (aiokafka sends no LeaveGroup for a static member), so its partitions wait the
    session timeout before moving to the others, and two live processes of a kind under one
    name fence each other. None (empty): dynamic membership. One name serves every group of a
    process: the name is unique within a group, and each process kind has groups of its own."""
    return cfg.group_instance_id or None


async def ensure_topics(cfg: Config, specs: tuple[TopicSpec, ...] | None = None,
                        timeout_s: float = 30.0) -> list[str]:
    """Create missing topics of the catalog (default: those cfg's principal may see); existing
    ones are left as they are. Returns the created names. Run as the local admin, it also
    grants the namespace's ACLs (events/access.py), so a new namespace is ready for every
    process kind."""
    principal = cfg.kafka_principal
    if specs is None:
        specs = access.visible(principal) if principal in access.PRINCIPALS else CATALOG
    client = admin(cfg, request_timeout_ms=15000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await client.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(
                    f"Kafka at LABBUS_KAFKA_BOOTSTRAP={cfg.kafka_bootstrap} does not answer; "
                    "start it with `labbus services up`") from None
            await asyncio.sleep(0.5)
    try:
        existing = set(await client.list_topics())
        wanted = [s for s in specs if topic_name(cfg, s) not in existing]
        created = []
        for spec in wanted:
            name = topic_name(cfg, spec)
            try:
                await client.create_topics([NewTopic(name, spec.partitions, 1,
                                                     topic_configs=spec.configs())])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process created it meanwhile
            except TopicAuthorizationFailedError:
                raise ConnectionError(
                    f"topic {name} does not exist and Kafka principal {security(cfg).username} "
                    "may not create it: create the topics as admin (`labbus topics create`, "
                    "which `labbus services up` runs)") from None
        if created:
            log.info("created topics", extra={"topics": created})
        if _is_local_admin(cfg):
            await ensure_acls(cfg, client)
        return created
    finally:
        await client.close()


def _is_local_admin(cfg: Config) -> bool:
    sec = security(cfg)
    return (sec.sasl and sec.username == access.ADMIN
            and access.local_credentials(cfg) is not None)


# --- ACLs (aiokafka's admin client has no ACL methods; its protocol module has the requests) ---

async def _send(client: AIOKafkaAdminClient, request):
    return await client._send_request(request)  # noqa: SLF001 - the admin client's own sender


def _many(request_class, bindings: list[access.Binding]):
    """A CreateAcls or DeleteAcls request for many ALLOW bindings at once (aiokafka's request
    classes carry one; each request is one metadata commit on the broker, ~30 ms, so a
    namespace's ~140 ACLs one by one took ~4 s). Version 1 or later: labbus's ACLs use pattern
    types (PREFIXED)."""
    from aiokafka.errors import IncompatibleBrokerVersion

    class Many(request_class):
        def __init__(self) -> None:
            pass

        def build(self, request_struct_class):
            if request_struct_class.API_VERSION < 1:
                raise IncompatibleBrokerVersion("ACL pattern types need Kafka 2.0 or later")
            return request_struct_class([
                (b.resource_type, b.name, b.pattern, f"User:{b.principal}", "*", b.operation,
                 access.ALLOW) for b in bindings])

    return Many()


async def describe_acls(cfg: Config, client: AIOKafkaAdminClient) -> list[access.Binding]:
    """Every ALLOW ACL for a user on a topic or group (other ACLs are not labbus's)."""
    from aiokafka.protocol.admin import DescribeAclsRequest

    response = await _send(client, DescribeAclsRequest(
        resource_type=1, resource_name=None, resource_pattern_type_filter=1, principal=None,
        host=None, operation=1, permission_type=1))  # ANY of each
    if response.error_code:
        raise ConnectionError(f"DescribeAcls failed: {response.error_code} "
                              f"{response.error_message}")
    found = []
    for rtype, name, pattern, acls in response.resources:
        for principal, _host, operation, permission in acls:
            if (rtype in (access.TOPIC, access.GROUP) and permission == access.ALLOW
                    and principal.startswith("User:") and operation in access.OPERATIONS):
                found.append(access.Binding(rtype, name, pattern, principal[5:], operation))
    return found


async def ensure_acls(cfg: Config, client: AIOKafkaAdminClient | None = None) -> int:
    """Create the ACLs of cfg's namespace that are missing (as the admin). Returns how many."""
    from aiokafka.protocol.admin import CreateAclsRequest

    own = client is None
    client = client or admin(cfg)
    if own:
        await client.start()
    try:
        missing = sorted(set(access.bindings(cfg)) - set(await describe_acls(cfg, client)))
        if missing:  # one request for all: the broker commits each request's ACLs at once
            response = await _send(client, _many(CreateAclsRequest, missing))
            for b, (code, message) in zip(missing, response.creation_responses, strict=True):
                if code:
                    raise ConnectionError(f"CreateAcls {b.describe()} failed: {code} {message}")
        if missing:
            # the controller has committed them; the broker's authorizer applies the metadata
            # log a moment later: a client of the namespace must not be refused meanwhile
            deadline = asyncio.get_running_loop().time() + 15.0
            while set(missing) - set(await describe_acls(cfg, client)):
                if asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError("the broker did not show the created ACLs within 15 s")
                await asyncio.sleep(0.1)
            log.info("created ACLs", extra={"acls": len(missing), "namespace": cfg.namespace})
        return len(missing)
    finally:
        if own:
            await client.close()


async def delete_namespace_acls(cfg: Config) -> int:
    """Remove the ACLs on resources of cfg's (non-empty) namespace. Returns how many."""
    from aiokafka.protocol.admin import DeleteAclsRequest

    client = admin(cfg)
    await client.start()
    try:
        found = await describe_acls(cfg, client)
        names = set(access.namespace_resources(cfg, sorted({b.name for b in found})))
        gone = [b for b in found if b.name in names]
        if gone:
            response = await _send(client, _many(DeleteAclsRequest, gone))
            for b, (code, message, _matches) in zip(gone, response.filter_responses,
                                                     strict=True):
                if code:
                    raise ConnectionError(f"DeleteAcls {b.describe()} failed: {code} {message}")
        return len(gone)
    finally:
        await client.close()


async def publish(cfg: Config, *events) -> None:
    """Send events to the catalog topics of their types (keyed by subject) and wait for the
    broker's acks: a one-off producer for command-line tools, not for a process's hot path."""
    from labbus.events.codec import default_codec

    await ensure_topics(cfg)
    codec = default_codec()
    sender = producer(cfg)
    await sender.start()
    try:
        for event in events:
            await (await sender.send(topic_for(cfg, event), codec.encode(event), key=event.key))
    finally:
        await sender.stop()


async def delete_namespace_topics(cfg: Config, namespace: str) -> list[str]:
    """Delete every topic of a namespace: its catalog topics and its faust apps' internal ones
    (what a benchmark or test run leaves behind on a shared broker), and, as the local admin,
    the namespace's ACLs. Returns the deleted topic names."""
    if not namespace:
        raise ValueError("refusing to delete the topics of the empty (production) namespace")
    client = admin(cfg, request_timeout_ms=30000)
    try:
        await client.start()
        names = [t for t in await client.list_topics() if t.startswith(namespace + ".")]
        if names:
            await client.delete_topics(names)
    finally:
        await client.close()
        if _is_local_admin(cfg):  # also when deleting the topics failed
            await delete_namespace_acls(dataclasses.replace(cfg, namespace=namespace))
    return names


async def start_new_group_at(cfg: Config, group: str, topics: list[str], since_ms: int) -> int:
    """Where `group` has never committed on a partition of `topics`, commit the offset of the
    first record at or after `since_ms` (the log end where there is none): a consumer whose
    inputs older than that are of no use (expired commands) then starts there on its first run,
    instead of reading the topic's whole history. Committed offsets are kept. Returns how many
    partitions were set. (A commit from outside the group fails while members are in it; those
    members' offsets then decide.)"""
    from aiokafka import TopicPartition
    from aiokafka.errors import CommitFailedError, IllegalGenerationError, UnknownMemberIdError

    client = consumer(cfg, group=group)
    await client.start()
    try:
        await client._client.force_metadata_update()  # noqa: SLF001 - topics may be brand new
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(client.partitions_for_topic(t) or ())]
        if not tps:
            return 0
        client.assign(tps)
        fresh = [tp for tp in tps if await client.committed(tp) is None]
        if not fresh:
            return 0
        ends = await client.end_offsets(fresh)
        found = await client.offsets_for_times({tp: since_ms for tp in fresh})
        offsets = {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in fresh}
        try:
            await client.commit(offsets)
        except (CommitFailedError, IllegalGenerationError, UnknownMemberIdError) as exc:
            log.info("group has members; its start offsets are theirs",
                     extra={"group": group, "error": repr(exc)})
            return 0
        return len(offsets)
    finally:
        await client.stop()


async def read_to_end(cfg: Config, *topics: str):
    """Yield every record of `topics` from the beginning up to their end offsets at call time
    (no consumer group, nothing committed)."""
    async for record in read_ranges(cfg, {t: None for t in topics}):
        yield record


async def read_ranges(cfg: Config, starts: dict):
    """Yield the records of each partition from its start offset up to its end offset at call
    time. `starts`: {TopicPartition: offset or None (the beginning)}, or {topic name: None} for
    every partition of a topic from the beginning. No consumer group, nothing committed."""
    from aiokafka import TopicPartition

    reader = consumer(cfg, group=None)
    await reader.start()
    try:
        await reader._client.force_metadata_update()  # noqa: SLF001 - topics may be brand new
        begin: dict = {}
        for where, offset in starts.items():
            if isinstance(where, str):
                for p in sorted(reader.partitions_for_topic(where) or ()):
                    begin[TopicPartition(where, p)] = None
            else:
                begin[where] = offset
        if not begin:
            return
        reader.assign(list(begin))
        end = await reader.end_offsets(list(begin))
        for tp, offset in begin.items():
            if offset is None:
                await reader.seek_to_beginning(tp)
            else:
                reader.seek(tp, offset)
        left = {tp for tp in begin if end[tp] > (begin[tp] or 0)}
        while left:
            batch = await reader.getmany(*left, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < end[tp]:
                        yield record
            for tp in list(left):
                if await reader.position(tp) >= end[tp]:
                    left.discard(tp)
    finally:
        await reader.stop()


async def follow_key(cfg: Config, topic: str, key: str, on_event: Callable[[Event], bool],
                     timeout_s: float | None = None, since_ms: int | None = None,
                     fetch_max_wait_ms: int = 100) -> Event | None:
    """Decode each record of `topic` with this key, in log order, and feed it to `on_event` until
    it returns True (that event is returned) or `timeout_s` passes (None: no timeout).
    Reads every partition from its first record at or after log time `since_ms` (a partition
    with none: from its end), else from the beginning; records that do not decode are skipped. A
    topic that does not exist yet is waited for. No consumer group, nothing committed."""
    from aiokafka import TopicPartition

    from labbus.events.codec import DecodeError, default_codec

    codec = default_codec()
    reader = consumer(cfg, group=None, fetch_max_wait_ms=fetch_max_wait_ms)
    await reader.start()
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    wanted = key.encode()
    try:
        while True:
            await reader._client.force_metadata_update()  # noqa: SLF001 - topics may be new
            partitions = sorted(reader.partitions_for_topic(topic) or ())
            if partitions:
                break
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(0.5)
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        if since_ms is None:
            await reader.seek_to_beginning(*tps)
        else:
            # the ends first: a record appended after the time lookup is at or past them
            ends = await reader.end_offsets(tps)
            found = await reader.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                reader.seek(tp, ends[tp] if found.get(tp) is None else found[tp].offset)
        while deadline is None or loop.time() < deadline:
            for records in (await reader.getmany(timeout_ms=200)).values():
                for record in records:
                    if record.key != wanted:
                        continue
                    try:
                        event = codec.decode(record.value)
                    except DecodeError:
                        continue
                    if on_event(event):
                        return event
        return None
    finally:
        await reader.stop()
