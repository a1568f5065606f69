"""kill -9 of the gateway while 50 devices stream: after they reconnect, PostgreSQL holds every
reading once.

The whole path runs as a user runs it: `labbus gateway grpc`, `labbus process validate` and
`labbus project postgres` as subprocesses on the real broker and database, 50 simulated devices
(producers/gateway/devices.py, mutual TLS, 5 readings/s and a heartbeat a second each) in this
process. The devices reach the gateway through a loopback TCP proxy (tests/support/proxy.py).
Mid-stream the proxy holds back what the gateway sends for 1.5 s while the devices go on
streaming: the gateway publishes their readings and its acknowledgements wait in the proxy. Then
the gateway is killed with SIGKILL and the proxy resets the connections (as a direct connection
to a killed process is reset), so the kill finds readings that are on the broker and that the
devices were never told about — the case where a re-send doubles a reading on the topic, made
certain instead of left to timing. The devices reconnect to a new gateway process on the same
port and re-send everything not acknowledged. Then the `measurements` read model must hold
exactly the readings the devices made: one row per (device, sequence) -> reading id, none
missing, none doubled, none else.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

import asyncpg
import pytest

from labbus.events import kafka
from labbus.events.codec import DecodeError, default_codec
from labbus.events.devices import reading_id
from labbus.events.topics import MEASUREMENTS_RECORDED, topic_name
from labbus.producers.gateway import devices as dev
from tests.conftest import consumer_lag, read_topic
from tests.support.gateway import Gateway
from tests.support.proxy import Proxy

pytestmark = pytest.mark.services

DEVICES = 50
RATE = 5.0  # readings/s per device


async def rows(dsn: str, prefix: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch("SELECT measurement_id, device_id FROM measurements "
                               "WHERE device_id LIKE $1", prefix + "-%")
    except asyncpg.UndefinedTableError:  # the projector has not migrated yet
        return []
    finally:
        await con.close()


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll an async predicate while the event loop (the devices) keeps running."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def unacked_readings(fleet: list[dev.SimDevice]) -> int:
    return sum(msg.WhichOneof("body") == "reading"
               for d in fleet for msg, _ in d.unacked.values())


async def test_kill_9_of_the_gateway_while_50_devices_stream_postgres_holds_every_reading_once(
        env, cfg, pki_dir, processes, tmp_path):
    started = time.monotonic()
    await kafka.ensure_topics(cfg)
    workers = {"validator": processes.start("process", "validate"),
               "projector-postgres": processes.start("project", "postgres")}
    gw = Gateway(env, pki_dir, tmp_path)
    await asyncio.to_thread(gw.start)
    proxy = Proxy("127.0.0.1", gw.port)
    target = f"127.0.0.1:{proxy.port}"
    stats = dev.Stats(track=True)
    prefix = f"k9pg-{uuid.uuid4().hex[:5]}"
    fleet = dev.make_fleet(DEVICES, RATE, stats, prefix=prefix, heartbeat_s=1.0)
    dev.ensure_certs(pki_dir, fleet)
    creds = {d.device_id: dev.credentials(pki_dir, d.device_id) for d in fleet}
    stop = asyncio.Event()
    runners = [asyncio.create_task(d.run(target, pki_dir, stop, creds=creds[d.device_id]))
               for d in fleet]
    try:
        await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in fleet)), 30)
        await asyncio.sleep(4)
        proxy.hold_replies()  # readings still reach the gateway; its acks wait in the proxy
        await asyncio.sleep(1.5)
        before_kill = stats.readings
        at_kill = unacked_readings(fleet)
        gw.kill9()
        proxy.cut()  # the devices' connections reset, the held acknowledgements dropped
        proxy.restore()
        await asyncio.to_thread(gw.start)  # the same port; the devices keep retrying meanwhile
        await wait_until(lambda: _all_connected(fleet), 30, "every device reconnected")
        await asyncio.sleep(3)
        for d in fleet:
            d.paused = True  # no new readings; heartbeats go on
        await wait_until(lambda: _nothing_unacked(stats, fleet), 30,
                         "every message acknowledged")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runners, return_exceptions=True), 20)
        gw.stop()
        proxy.close()
    assert before_kill >= DEVICES * RATE * 5 * 0.8, before_kill  # streaming when killed
    assert at_kill >= DEVICES * RATE * 1.5 * 0.5, at_kill  # the held acknowledgements
    assert stats.reconnects >= DEVICES, stats.reconnects

    expected = {uuid.UUID(reading_id(d, s)): (d, s) for d, seqs in stats.sent.items()
                for s in seqs}
    assert len(expected) == stats.readings  # one id per (device, sequence)

    deadline = time.monotonic() + 60  # then the assertions below say what is missing
    while len(await rows(cfg.postgres_dsn, prefix)) < len(expected) and (
            time.monotonic() < deadline):
        await asyncio.sleep(0.3)
    for name, proc in workers.items():  # every re-sent copy handled too, not only the first
        await wait_until(lambda p=proc, n=name: _zero_lag(p.metrics_url, n), 30,
                         f"{name} reporting consumer lag 0")
    found = await rows(cfg.postgres_dsn, prefix)
    per_id = collections.Counter(r["measurement_id"] for r in found)
    doubled = {expected.get(i, i): n for i, n in per_id.items() if n > 1}
    missing = sorted(expected[i] for i in expected.keys() - per_id.keys())
    unknown = per_id.keys() - expected.keys()
    assert not doubled, f"readings in PostgreSQL more than once: {doubled}"
    assert not missing, f"{len(missing)} readings missing from PostgreSQL, e.g. {missing[:5]}"
    assert not unknown, f"rows the devices never sent: {sorted(unknown)[:5]}"
    assert len(found) == len(expected)
    assert all(r["device_id"] == expected[r["measurement_id"]][0] for r in found)

    # the re-sent readings the broker already had: on the topic twice, in PostgreSQL once
    codec = default_codec()
    on_topic = collections.Counter()
    for r in await read_topic(cfg, topic_name(cfg, MEASUREMENTS_RECORDED)):
        if r.key and r.key.startswith(prefix.encode()):
            try:
                on_topic[codec.decode(r.value).event_id] += 1
            except DecodeError:
                continue
    assert on_topic.keys() == expected.keys()
    twice = sum(n > 1 for n in on_topic.values())
    assert twice > 0, "no reading was re-sent after the broker had it: nothing to drop"
    print(f"{len(expected)} readings from {DEVICES} devices; {at_kill} unacknowledged at the "
          f"kill, {stats.resent} messages re-sent, "
          f"{twice} readings twice on the topic; "
          f"broken sessions seen by the devices {dict(stats.errors)}; "
          f"{time.monotonic() - started:.1f} s")


async def _all_connected(fleet) -> bool:
    return all(d.connected.is_set() for d in fleet)


async def _nothing_unacked(stats, fleet) -> bool:
    return stats.unacked(fleet) == 0


async def _zero_lag(metrics_url: str, process: str) -> bool:
    return await asyncio.to_thread(consumer_lag, metrics_url, process) == 0
