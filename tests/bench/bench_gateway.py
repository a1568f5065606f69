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
import multiprocessing
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
from labbus.producers.gateway import gctune, pki  # noqa: E402
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
    namespace = f"bench-gw-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "LABBUS_NAMESPACE": namespace, "LABBUS_LOG_LEVEL": "WARNING"}
    cfg = config.load(env)
    pki_dir = Path(tempfile.mkdtemp(prefix="labbus-bench-pki-"))
    env["LABBUS_PKI_DIR"] = str(pki_dir)
    pki.init_ca(pki_dir)
    fleet = dev.make_fleet(args.devices, args.rate, dev.Stats(), prefix="bench")
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
    loop = asyncio.get_running_loop()
    target = f"127.0.0.1:{port}"
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for part in range(args.sim_processes):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(theirs, args, str(pki_dir), target, part,
                                                 args.sim_processes), daemon=True)
        proc.start()
        pipes.append(mine)
        procs.append(proc)

    async def each(message=None) -> list:
        if message is not None:
            for p in pipes:
                p.send(message)
        return list(await asyncio.gather(*(loop.run_in_executor(None, p.recv)
                                           for p in pipes)))

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
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        rss.stopped.set()
        gw.terminate()
        gw.wait(30)
        await kafka.delete_namespace_topics(cfg, namespace)
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
    parser.add_argument("--sim-processes", type=int, default=1,
                        help="simulator processes sharing the devices (1 = one process drives "
                             "them all)")
    a = parser.parse_args()
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(main(a)), indent=2))
