"""gRPC gateway benchmark: N concurrent device streams (mutual TLS, one certificate each) from
this one process, R readings/s each, through `labbus gateway grpc` to Kafka (acks=all).

    .venv/bin/python tests/bench/bench_gateway.py [--devices 1000] [--rate 5] [--seconds 30]

Measures, over the window after a warm-up: readings/s acknowledged by the gateway (an ack is
sent only once the broker acknowledged the event), device-send -> ack latency p50/p99, and the
gateway process's peak RSS. Runs in a fresh namespace against `labbus services up`'s broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
from labbus.producers.gateway import devices as dev  # noqa: E402
from labbus.producers.gateway import pki  # noqa: E402
from tests.conftest import free_port  # noqa: E402


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def main(args) -> dict:
    namespace = f"bench-gw-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "LABBUS_NAMESPACE": namespace, "LABBUS_LOG_LEVEL": "WARNING"}
    cfg = config.load(env)
    pki_dir = Path(tempfile.mkdtemp(prefix="labbus-bench-pki-"))
    env["LABBUS_PKI_DIR"] = str(pki_dir)
    pki.init_ca(pki_dir)
    stats = dev.Stats()
    fleet = dev.make_fleet(args.devices, args.rate, stats, prefix="bench", heartbeat_s=5.0)
    t0 = time.perf_counter()
    dev.ensure_certs(pki_dir, fleet)
    print(f"{args.devices} device certificates issued in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    await kafka.ensure_topics(cfg)
    port = free_port()
    log = open(pki_dir / "gateway.log", "w")
    gw = subprocess.Popen([LABBUS, "gateway", "grpc", "--port", str(port), "--metrics-port",
                           "-1"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    rss = PeakRss(gw.pid)
    rss.start()
    gw_cpu0 = None
    stop = asyncio.Event()
    creds = {d.device_id: dev.credentials(pki_dir, d.device_id) for d in fleet}
    target = f"127.0.0.1:{port}"
    runners = [asyncio.create_task(d.run(target, pki_dir, stop, creds=creds[d.device_id]))
               for d in fleet]
    try:
        t0 = time.perf_counter()
        while sum(d.connected.is_set() for d in fleet) < len(fleet):
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("devices did not all connect within 120 s")
            await asyncio.sleep(0.5)
        connect_s = time.perf_counter() - t0
        print(f"{len(fleet)} streams connected in {connect_s:.1f} s; warming up "
              f"{args.warmup} s", file=sys.stderr)
        await asyncio.sleep(args.warmup)
        stats.latencies_s.clear()
        acked0, sent0 = stats.acked, stats.readings
        gw_proc = psutil.Process(gw.pid)
        gw_cpu0 = gw_proc.cpu_times()
        me0 = psutil.Process().cpu_times()
        start = time.perf_counter()
        await asyncio.sleep(args.seconds)
        window = time.perf_counter() - start
        lat = list(stats.latencies_s)
        acked, sent = stats.acked - acked0, stats.readings - sent0
        gw_cpu1 = gw_proc.cpu_times()
        me1 = psutil.Process().cpu_times()
        for d in fleet:
            d.paused = True
        deadline = time.monotonic() + 60
        while stats.unacked(fleet) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*runners, return_exceptions=True)
        rss.stopped.set()
        gw.terminate()
        gw.wait(30)
        await kafka.delete_namespace_topics(cfg, namespace)
    readings_acked = len(lat)
    result = {
        "devices": args.devices, "rate_per_device": args.rate, "window_s": round(window, 1),
        "connect_all_s": round(connect_s, 1),
        "readings_sent_per_s": round(sent / window),
        "readings_acked_per_s": round(readings_acked / window),
        "messages_acked_per_s": round(acked / window),  # readings + heartbeats
        "send_to_broker_ack_ms": {"p50": round(pct(lat, 0.5) * 1000, 1),
                                  "p99": round(pct(lat, 0.99) * 1000, 1),
                                  "max": round(max(lat) * 1000, 1) if lat else None,
                                  "mean": round(statistics.fmean(lat) * 1000, 1) if lat else None},
        "gateway_peak_rss_mb": round(rss.peak / 2**20),
        "gateway_cpu_percent": round(100 * ((gw_cpu1.user + gw_cpu1.system)
                                            - (gw_cpu0.user + gw_cpu0.system)) / window),
        "simulator_cpu_percent": round(100 * ((me1.user + me1.system)
                                              - (me0.user + me0.system)) / window),
        "errors": dict(stats.errors), "reconnects": stats.reconnects,
        "left_unacked": stats.unacked(fleet),
        "machine": f"{platform.system()} {platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"Python {platform.python_version()}",
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0, help="readings/s per device")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=10.0)
    a = parser.parse_args()
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(main(a)), indent=2))
