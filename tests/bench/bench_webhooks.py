"""Webhook benchmark: events per second `labbus webhooks` delivers, and the latency from an
event's publication to its arrival at the receiver.

    .venv/bin/python tests/bench/bench_webhooks.py [--events 500] [--targets 1]

In a fresh namespace against `labbus services up`'s broker: a real HTTP receiver on loopback
(http.server in a thread, answering 204) and --targets targets that all take
lab.quality.AnomalyDetected. --events events are published first; then `labbus webhooks` (as
its principal) starts and drains that backlog: deliveries/s from the first arrival to the last,
and the process's user+system CPU meanwhile. Then --latency-events events one at a time (5/s):
latency from each send (one producer, started) to its arrival at the receiver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import kafka  # noqa: E402
from labbus.processors.webhooks import new_secret  # noqa: E402
from tests.bench.gwfleet import Namespace, cpu_s, machine, pct  # noqa: E402
from tests.support.webhook_receiver import Receiver, anomaly  # noqa: E402


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


async def latency(ns, receiver, n: int, targets: int) -> list[float]:
    from labbus.events.codec import default_codec
    from labbus.events.topics import topic_for

    codec = default_codec()
    producer = kafka.producer(ns.cfg)
    await producer.start()
    out = []
    try:
        for i in range(n):
            e = anomaly(f"lat-{i}")
            t0 = time.time()
            await (await producer.send(topic_for(ns.cfg, e), codec.encode(e), key=e.key))
            while len(receiver.of(str(e.event_id))) < targets:
                await asyncio.sleep(0.002)
            out += [(r.at - t0) * 1000 for r in receiver.of(str(e.event_id))]
            if max(out[-targets:]) > 1000:
                print(f"slow: event {i}: " + ", ".join(
                    f"{r.path} {(r.at - t0) * 1000:.0f} ms" for r in receiver.of(str(e.event_id))),
                    file=sys.stderr)
            await asyncio.sleep(max(0.0, 0.2 - (time.time() - t0)))
    finally:
        await producer.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--targets", type=int, default=1)
    p.add_argument("--latency-events", type=int, default=50)
    args = p.parse_args()
    ns = Namespace.create("bench-webhooks", 0)
    asyncio.run(kafka.ensure_topics(ns.cfg))
    receiver = Receiver()
    secret = new_secret()
    conf = Path(tempfile.mkdtemp()) / "webhooks.json"
    conf.write_text(json.dumps({"targets": [
        {"name": f"t{i}", "url": f"{receiver.url}/t{i}", "secret": secret,
         "event_types": ["lab.quality.AnomalyDetected"]} for i in range(args.targets)]}))
    log = open(conf.with_suffix(".log"), "w")
    events = [anomaly(f"dev-{i % 50}") for i in range(args.events)]
    ids = {str(e.event_id): e for e in events}
    asyncio.run(kafka.publish(ns.cfg, *events))  # a backlog, before the process starts
    proc = subprocess.Popen([LABBUS, "webhooks", "--metrics-port", "-1"],
                            env={**ns.env, "LABBUS_WEBHOOKS_CONFIG": str(conf)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: any(r.event_id in ids for r in receiver.requests), 120, "a delivery")
        cpu0 = cpu_s(proc.pid)
        wait(lambda: sum(r.event_id in ids for r in receiver.requests)
             >= args.events * args.targets, 600, "every delivery")
        cpu = cpu_s(proc.pid) - cpu0
        got = sorted(r.at for r in receiver.requests if r.event_id in ids)
        drain = got[-1] - got[0]
        # latency: one event at a time, 5 per second, from the send (one producer, started)
        lat = asyncio.run(latency(ns, receiver, args.latency_events, args.targets))
        print(f"{machine()}; backlog of {args.events} events x {args.targets} target(s) "
              f"delivered in {drain:.2f} s: {(len(got) - 1) / drain:.0f} deliveries/s, webhooks "
              f"process CPU {cpu:.2f} s ({cpu / len(got) * 1000:.2f} ms per delivery); "
              f"{args.latency_events} events one at a time, send to arrival: "
              f"p50 {pct(lat, 0.5):.0f} ms, p99 {pct(lat, 0.99):.0f} ms, max {max(lat):.0f} ms")
    finally:
        proc.terminate()
        proc.wait(20)
        print(conf.with_suffix(".log").read_text()[-3000:], file=sys.stderr)
        receiver.close()
        asyncio.run(ns.drop())


if __name__ == "__main__":
    main()
