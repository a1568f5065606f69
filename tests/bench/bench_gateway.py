"""gRPC gateway benchmark: N concurrent device streams (mutual TLS, one certificate each) from
one simulator process (or --sim-processes P sharing them), R readings/s each, through
`labbus gateway grpc` to Kafka (acks=all).

    .venv/bin/python tests/bench/bench_gateway.py [--devices 1000] [--rate 5] [--seconds 30]
        [--sim-processes 1]

Measures, over the window after a warm-up: readings/s acknowledged by the gateway (an ack is
sent only once the broker acknowledged the event), device-send -> ack latency p50/p99, and the
gateway process's peak RSS. Runs in a fresh namespace against `labbus services up`'s broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.events import kafka  # noqa: E402
from labbus.producers.gateway import devices as dev  # noqa: E402
from labbus.producers.gateway import gctune  # noqa: E402
from tests.bench.gwfleet import Namespace, PeakRss, Simulators, machine, pct  # noqa: E402


def _worker(conn, args, pki_dir: str, target: str, part: int, parts: int) -> None:
    """One simulator process driving every `parts`-th device from `part` (spawned)."""
    import uvloop

    uvloop.install()
    asyncio.run(_drive(conn, args, Path(pki_dir), target, part, parts))


async def _drive(conn, args, pki_dir: Path, target: str, part: int, parts: int) -> None:
    loop = asyncio.get_running_loop()
    stats = dev.Stats()
    fleet = dev.make_fleet(args.devices, args.rate, stats, prefix="bench",
                           heartbeat_s=5.0)[part::parts]
    creds = {d.device_id: dev.credentials(pki_dir, d.device_id) for d in fleet}
    gctune.tune()  # as run_fleet (labbus agent sim --grpc) does
    stop = asyncio.Event()
    runners = [asyncio.create_task(d.run(target, pki_dir, stop, creds=creds[d.device_id]))
               for d in fleet]
    me = psutil.Process()
    try:
        while sum(d.connected.is_set() for d in fleet) < len(fleet):
            await asyncio.sleep(0.2)
        conn.send("connected")
        await loop.run_in_executor(None, conn.recv)  # the window starts
        stats.latencies_s.clear()
        acked0, sent0, cpu0 = stats.acked, stats.readings, me.cpu_times()
        await loop.run_in_executor(None, conn.recv)  # the window ends
        cpu1 = me.cpu_times()
        conn.send({"latencies": list(stats.latencies_s), "acked": stats.acked - acked0,
                   "sent": stats.readings - sent0,
                   "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)})
        for d in fleet:
            d.paused = True
        deadline = time.monotonic() + 60
        while stats.unacked(fleet) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left = stats.unacked(fleet)  # (heartbeats go on while paused: count before stopping)
    finally:
        stop.set()
        await asyncio.gather(*runners, return_exceptions=True)
        conn.send({"errors": dict(stats.errors), "reconnects": stats.reconnects,
                   "left_unacked": left if "left" in locals() else stats.unacked(fleet)})


async def main(args) -> dict:
    ns = Namespace.create("bench-gw", args.devices)
    cfg = ns.cfg
    await kafka.ensure_topics(cfg)
    gw, target = ns.start_gateway()
    rss = PeakRss(gw.pid)
    rss.start()
    sims = Simulators(_worker, (args, str(ns.pki_dir), target), args.sim_processes)
    each = sims.each
    pipes = sims.pipes

    finals: list = []
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(each(), 120)  # every process: all its streams connected
        connect_s = time.perf_counter() - t0
        print(f"{args.devices} streams connected in {connect_s:.1f} s from "
              f"{args.sim_processes} simulator process(es); warming up {args.warmup} s",
              file=sys.stderr)
        await asyncio.sleep(args.warmup)
        gw_proc = psutil.Process(gw.pid)
        gw_cpu0 = gw_proc.cpu_times()
        start = time.perf_counter()
        for p in pipes:
            p.send("start")
        await asyncio.sleep(args.seconds)
        window = time.perf_counter() - start
        gw_cpu1 = gw_proc.cpu_times()
        parts = await each("end")
        finals = await asyncio.wait_for(each(), 120)
    finally:
        sims.join()
        rss.stopped.set()
        gw.terminate()
        gw.wait(30)
        await kafka.delete_namespace_topics(cfg, ns.name)
    lat = [x for part in parts for x in part["latencies"]]
    acked = sum(part["acked"] for part in parts)
    sent = sum(part["sent"] for part in parts)
    errors: dict = {}
    for f in finals:
        for k, v in f["errors"].items():
            errors[k] = errors.get(k, 0) + v
    result = {
        "devices": args.devices, "rate_per_device": args.rate,
        "simulator_processes": args.sim_processes, "window_s": round(window, 1),
        "connect_all_s": round(connect_s, 1),
        "readings_sent_per_s": round(sent / window),
        "readings_acked_per_s": round(len(lat) / window),
        "messages_acked_per_s": round(acked / window),  # readings + heartbeats
        "send_to_broker_ack_ms": {"p50": round(pct(lat, 0.5) * 1000, 1),
                                  "p99": round(pct(lat, 0.99) * 1000, 1),
                                  "max": round(max(lat) * 1000, 1) if lat else None,
                                  "mean": round(statistics.fmean(lat) * 1000, 1) if lat else None},
        "gateway_peak_rss_mb": round(rss.peak / 2**20),
        "gateway_cpu_percent": round(100 * ((gw_cpu1.user + gw_cpu1.system)
                                            - (gw_cpu0.user + gw_cpu0.system)) / window),
        "simulator_cpu_percent": round(100 * sum(part["cpu_s"] for part in parts) / window),
        "errors": errors, "reconnects": sum(f["reconnects"] for f in finals),
        "left_unacked": sum(f["left_unacked"] for f in finals),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "machine": machine(),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0, help="readings/s per device")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--sim-processes", type=int, default=1,
                        help="simulator processes sharing the devices (1 = one process drives "
                             "them all)")
    a = parser.parse_args()
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(main(a)), indent=2))
