"""Outbound webhooks: events POSTed as signed JSON to the systems of the lab (LIMS, QMS, a
project tracker), each delivery attempt itself an event on lab.webhooks.

    lab.alerts, lab.experiments, ... ──► one consumer group per target (`labbus.webhooks.<name>`)
        ──► Forwarder (this module's handler, on the kernel's `run_consumer`)
              POST, retried with exponential backoff and jitter, at most max_attempts times
              ──► WebhookDeliveryAttempted per attempt, then WebhookDelivered or
                  WebhookDeadLettered, on lab.webhooks ──► acks ──► the offset is committed

The pure parts are plain functions tested without services: the targets' configuration
(`load_targets`), the body (`event_body`), the signature (`signature`, `verify`, the Standard
Webhooks scheme) and the backoff (`backoff_delay`). `Forwarder` is the handler; the runtime does
the consuming, producing, committing and dead-lettering of undecodable input
(deploy/bootstrap.py `webhooks`).

Delivery is at least once: an event's offset is committed only after its outcome (delivered or
dead-lettered) is acknowledged by the broker, so a crash in between sends it again, with the
same `webhook-id` header (the event's id) and the same body: receivers deduplicate by that id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import ssl
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from labbus.events.access import BY_PRINCIPAL
from labbus.events.config import Config, ConfigError
from labbus.events.model import (
    EVENT_TYPES,
    Actor,
    Event,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryAttempted,
    derived_id,
)
from labbus.events.topics import CATALOG, WEBHOOKS, TopicSpec

log = logging.getLogger(__name__)

ENV = "LABBUS_WEBHOOKS_CONFIG"
PRINCIPAL = "webhooks"
BODY_FORMAT = "labbus.webhook.v1"
SECRET_PREFIX = "whsec_"
USER_AGENT = "labbus-webhooks/1"
# Kafka's max.poll.interval.ms (aiokafka's default, 300 s): a consumer that does not ask for the
# next record within it is put out of its group. One event's delivery, all its attempts and
# backoffs included, must end well before that.
MAX_DELIVERY_S = 240.0


class Stopped(BaseException):
    """The process was asked to stop during a backoff: the delivery is abandoned uncommitted
    (sent again at the next start, as after a crash). A BaseException, so that the runtime's
    dead-letter policy (which catches Exception) lets it through."""


# -- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One receiver: where, with which secret, which event types, how hard to try."""

    name: str
    url: str
    secret: bytes = field(repr=False)
    event_types: tuple[str, ...]
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    timeout_s: float = 10.0
    ca_file: Path | None = None

    @property
    def process(self) -> str:
        """Its consumer group's process name (labbus.webhooks.<name>) and metrics label."""
        return f"{PRINCIPAL}.{self.name}"

    @property
    def endpoint(self) -> str:
        return redacted(self.url)

    def worst_case_s(self) -> float:
        """The longest one event's delivery can take: every attempt timing out, every backoff
        at its longest."""
        waits = sum(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (n - 1))
                    for n in range(1, self.max_attempts))
        return self.max_attempts * self.timeout_s + waits

    def topics(self) -> list[TopicSpec]:
        return sorted({topic_of(t) for t in self.event_types}, key=lambda s: s.name)


DEFAULTS = {"max_attempts": 5, "backoff_initial_s": 1.0, "backoff_max_s": 30.0,
            "timeout_s": 10.0}
TARGET_KEYS = {"name", "url", "secret", "secret_env", "event_types", "ca_file", "allow_http",
               *DEFAULTS}
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def topic_of(event_type: str) -> TopicSpec:
    """The catalog topic that carries `event_type` (its own topic, not a copy's)."""
    for spec in CATALOG:
        if event_type in spec.event_types:
            return spec
    raise KeyError(event_type)


def redacted(url: str) -> str:
    """The URL without user info, query or fragment (which may hold credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_secret(text: str) -> bytes:
    """A Standard Webhooks secret, `whsec_` + base64 of 24 to 64 random bytes: the HMAC key.
    Raises ValueError with the reason."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX} (make one with `labbus webhooks "
                         "--new-secret`)")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{SECRET_PREFIX} must be followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must hold 24 to 64 bytes, not {len(key)}")
    return key


def new_secret() -> str:
    """A fresh secret for a target (32 random bytes), to give to its receiver too."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def _read(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        return tomllib.loads(text)
    return json.loads(text)


def load_targets(path: Path | None, environ: Mapping[str, str] | None = None
                 ) -> tuple[Target, ...]:
    """The targets of the configuration file at `path` (LABBUS_WEBHOOKS_CONFIG). Raises
    ConfigError naming the variable and the field at fault."""
    env = os.environ if environ is None else environ
    if path is None:
        raise ConfigError(f"{ENV} is not set: `labbus webhooks` needs a file of targets "
                          "(README \"Webhooks\")")
    where = f"{ENV}={str(path)!r}"
    try:
        doc = _read(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"{where}: cannot read it: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a table (TOML) or an object (JSON) at the top")
    unknown = set(doc) - {"targets", *DEFAULTS}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                          f"targets, {', '.join(DEFAULTS)}")
    defaults = {k: _number(where, k, doc.get(k, v), k == "max_attempts")
                for k, v in DEFAULTS.items()}
    raw = doc.get("targets")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: targets: expected a non-empty list of targets")
    targets = tuple(_target(f"{where}: targets[{i}]", t, defaults, env)
                    for i, t in enumerate(raw))
    names = [t.name for t in targets]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}: targets: the name {name!r} is used twice")
    return targets


def _number(where: str, key: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: {key}: expected {'an integer' if integer else 'a number'}, "
                          f"not {value!r}")
    low, high = (1, 100) if key == "max_attempts" else (0.001, 3600.0)
    if not (low <= value <= high) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key}: {value!r} must be between {low} and {high}")
    return value


def _target(where: str, raw: Any, defaults: dict, env: Mapping[str, str]) -> Target:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table/object with name, url, secret, "
                          "event_types")
    unknown = set(raw) - TARGET_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                          f"{', '.join(sorted(TARGET_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r}: lower-case letters, digits, '-' and '_' "
                          "(it names the target's consumer group)")
    where = f"{where} ({name})"
    url = _url(where, raw.get("url"), raw.get("allow_http", False))
    secret = _secret(where, raw, env)
    types = raw.get("event_types")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{where}.event_types: expected a non-empty list of event type names, "
                          "e.g. [\"lab.quality.AnomalyDetected\"]")
    for t in types:
        _event_type(f"{where}.event_types", t)
    options = {k: _number(f"{where}", k, raw.get(k, defaults[k]), k == "max_attempts")
               for k in DEFAULTS}
    ca = raw.get("ca_file")
    if ca is not None and (not isinstance(ca, str) or not Path(ca).expanduser().is_file()):
        raise ConfigError(f"{where}.ca_file: {ca!r} is not a file")
    target = Target(name, url, secret, tuple(dict.fromkeys(types)),
                    ca_file=Path(ca).expanduser() if ca else None, **options)
    if options["backoff_max_s"] < options["backoff_initial_s"]:
        raise ConfigError(f"{where}.backoff_max_s: {options['backoff_max_s']} is below "
                          f"backoff_initial_s {options['backoff_initial_s']}")
    worst = target.worst_case_s()
    if worst > MAX_DELIVERY_S:
        raise ConfigError(
            f"{where}: one event's delivery could take {worst:.0f} s (max_attempts x timeout_s "
            f"+ the backoffs), more than {MAX_DELIVERY_S:.0f} s: Kafka would put the consumer out "
            "of its group (max.poll.interval.ms 300 s); lower max_attempts, timeout_s or "
            "backoff_max_s")
    return target


def _url(where: str, url: Any, allow_http: Any) -> str:
    if not isinstance(allow_http, bool):
        raise ConfigError(f"{where}.allow_http: expected true or false")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: {url!r}: expected an https:// URL")
    host = parts.hostname
    loopback = host.startswith("127.") or host in ("localhost", "::1")
    if parts.scheme == "http" and not (loopback or allow_http):
        raise ConfigError(f"{where}.url: {redacted(url)!r}: http:// only on a loopback address "
                          "(or set allow_http = true: the events then cross the network in "
                          "plain text)")
    return url


def _secret(where: str, raw: dict, env: Mapping[str, str]) -> bytes:
    if ("secret" in raw) == ("secret_env" in raw):
        raise ConfigError(f"{where}: give either secret or secret_env (the name of an "
                          "environment variable holding it)")
    if "secret_env" in raw:
        var = raw["secret_env"]
        if not isinstance(var, str) or not env.get(var):
            raise ConfigError(f"{where}.secret_env: the environment variable {var!r} is not set")
        text, what = env[var], f"{where}.secret_env ({var})"
    else:
        text, what = raw["secret"], f"{where}.secret"
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a string")
    try:
        return parse_secret(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _event_type(where: str, name: str) -> None:
    if name not in EVENT_TYPES:
        like = [t for t in EVENT_TYPES if t.rsplit(".", 1)[-1] == name]
        hint = f" (did you mean {' or '.join(like)}?)" if like else ""
        raise ConfigError(f"{where}: {name!r} is no event type of labbus{hint}")
    if name in WEBHOOKS.event_types:
        raise ConfigError(f"{where}: {name!r}: the webhooks' own events are not forwarded (a "
                          "target would be sent its own deliveries without end)")
    try:
        spec = topic_of(name)
    except KeyError:
        raise ConfigError(f"{where}: {name!r} is on no topic of the catalog") from None
    if spec not in BY_PRINCIPAL[PRINCIPAL].reads:
        raise ConfigError(f"{where}: {name!r} is on {spec.name}, which the {PRINCIPAL!r} "
                          "principal may not read (events/access.py)")


def targets_of(cfg: Config) -> tuple[Target, ...]:
    return load_targets(cfg.webhooks_config)


# -- the body --------------------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return timestamp_text(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, Actor):
        return _json_value(value.to_record())
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def timestamp_text(value: datetime) -> str:
    """RFC 3339, UTC, microseconds: 2026-01-02T03:04:05.000006Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_document(event: Event) -> dict:
    """The JSON document of an event (format labbus.webhook.v1): the envelope and the payload
    in schema order; uuids and times as strings (RFC 3339, UTC), bytes as base64, NaN and
    infinities as null."""
    env = event.envelope
    envelope = {f.name: _json_value(getattr(env, f.name)) for f in fields(env)}
    payload = {f.name: _json_value(getattr(event, f.name)) for f in fields(event)
               if f.name != "envelope"}
    return {"format": BODY_FORMAT, "envelope": envelope, "payload": payload}


def event_body(event: Event) -> bytes:
    """The exact bytes POSTed (and signed): compact UTF-8 JSON of `event_document`."""
    return json.dumps(event_document(event), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


# -- the signature (Standard Webhooks v1, https://www.standardwebhooks.com) ----------------------

def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` + base64(HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>"))."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(key: bytes, event: Event, body: bytes, timestamp: int, attempt: int) -> dict:
    """The headers of one attempt: a new timestamp, and so a new signature, every attempt."""
    msg_id = str(event.event_id)
    return {"content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, msg_id, timestamp, body),
            "labbus-event-type": event.TYPE,
            "labbus-delivery-attempt": str(attempt)}


def verify(secret: str, request_headers: Mapping[str, str], body: bytes,
           now: float | None = None, tolerance_s: float = 300.0) -> bool:
    """What a receiver does (in Python; any Standard Webhooks library does the same): the
    signature over the id, the timestamp and the raw body, compared in constant time, and the
    timestamp within `tolerance_s` of its clock (replays of old requests refused)."""
    h = {k.lower(): v for k, v in request_headers.items()}
    msg_id, ts, sent = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and ts and sent) or not ts.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(ts)) > tolerance_s:
        return False
    expected = signature(parse_secret(secret), msg_id, int(ts), body)
    return any(hmac.compare_digest(expected, s) for s in sent.split())


# -- retries -------------------------------------------------------------------------------------

def backoff_delay(attempt: int, initial_s: float, max_s: float, rand: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): exponential (initial_s,
    doubling, capped at max_s) with "equal jitter": a uniform draw between half of it and all
    of it (`rand` in [0, 1)), so receivers coming back are not hit by every sender at once and
    the wait still grows."""
    ceiling = min(max_s, initial_s * 2 ** (attempt - 1))
    return ceiling / 2 + ceiling / 2 * rand


def describe(exc: BaseException) -> str:
    """A transport error as a reason: its type, its message and its cause's (httpx says "All
    connection attempts failed", the cause "Connect call failed ('127.0.0.1', 9)")."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause, depth = exc.__cause__ or exc.__context__, 0
    while cause is not None and depth < 5:  # the first cause that says something new
        if str(cause) and str(cause) not in text:
            return text + f" ({type(cause).__name__}: {cause})"
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    return text


def accepted(status: int | None) -> bool:
    """A 2xx answer. Anything else is retried (Standard Webhooks' advice; redirects are not
    followed): a 4xx can be a receiver being redeployed or misconfigured for a while."""
    return status is not None and 200 <= status < 300


# -- the handler ---------------------------------------------------------------------------------

class Forwarder:
    """The handler of one target: POST each accepted event until it is accepted or its attempts
    are spent, yielding an event for every attempt and one for the outcome."""

    def __init__(self, target: Target, stop: asyncio.Event | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.target = target
        self.accepts = frozenset(target.event_types)
        self.stop = stop or asyncio.Event()
        self.rand = rand
        self._client = None

    async def post(self, url: str, body: bytes, hdrs: dict) -> tuple[int, str]:
        """(status code, the start of the answer's text)."""
        if self._client is None:
            import httpx

            verify = (ssl.create_default_context(cafile=str(self.target.ca_file))
                      if self.target.ca_file else True)
            self._client = httpx.AsyncClient(timeout=self.target.timeout_s, verify=verify,
                                             follow_redirects=False)
        resp = await self._client.post(url, content=body, headers=hdrs)
        return resp.status_code, resp.text[:200]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def __call__(self, event: Event, record) -> AsyncIterator[Event]:
        t = self.target
        body = event_body(event)
        started = time.perf_counter()
        common = dict(target=t.name, endpoint=t.endpoint, forwarded_event_id=event.event_id,
                      forwarded_event_type=event.TYPE)
        causal = dict(source=t.process, subject=t.name,
                      correlation_id=event.envelope.correlation_id or event.event_id,
                      causation_id=event.event_id)
        for attempt in range(1, t.max_attempts + 1):
            if self.stop.is_set():
                raise Stopped()
            at = datetime.now(UTC)
            t0 = time.perf_counter()
            status, error = await self._attempt(event, body, attempt)
            duration_ms = (time.perf_counter() - t0) * 1000
            ok = accepted(status)
            delay = (None if ok or attempt == t.max_attempts else
                     backoff_delay(attempt, t.backoff_initial_s, t.backoff_max_s, self.rand()))
            yield WebhookDeliveryAttempted.create(
                sequence=attempt, occurred_at=at, **causal, **common, attempt=attempt,
                max_attempts=t.max_attempts, status_code=status, error=error,
                duration_ms=duration_ms, retry_in_ms=None if delay is None else delay * 1000)
            if ok:
                yield WebhookDelivered.create(
                    sequence=attempt, **causal, **common, attempts=attempt, status_code=status,
                    elapsed_ms=(time.perf_counter() - started) * 1000,
                    event_id=uuid.UUID(derived_id(event.event_id, f"webhook/{t.name}/delivered")))
                return
            if delay is None:
                log.error("webhook delivery dead-lettered", extra={
                    "target": t.name, "event_id": str(event.event_id), "attempts": attempt,
                    "error": error})
                yield WebhookDeadLettered.create(
                    sequence=attempt, **causal, **common, source_topic=record.topic,
                    source_partition=record.partition, source_offset=record.offset,
                    attempts=attempt, last_status_code=status, reason=error or "",
                    body=body.decode(),
                    event_id=uuid.UUID(derived_id(event.event_id,
                                                  f"webhook/{t.name}/dead-lettered")))
                return
            log.warning("webhook attempt failed; retrying", extra={
                "target": t.name, "event_id": str(event.event_id), "attempt": attempt,
                "error": error, "retry_in_s": round(delay, 3)})
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except TimeoutError:
                continue
            raise Stopped()

    async def _attempt(self, event: Event, body: bytes, attempt: int
                       ) -> tuple[int | None, str | None]:
        """(status, None) when accepted, else (status or None, why it failed)."""
        hdrs = headers(self.target.secret, event, body, int(time.time()), attempt)
        try:
            status, text = await self.post(self.target.url, body, hdrs)
        except Exception as exc:  # noqa: BLE001 - any transport error is a failed attempt
            return None, describe(exc)
        if accepted(status):
            return status, None
        return status, f"HTTP {status}" + (f": {text.strip()}" if text.strip() else "")
