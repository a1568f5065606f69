"""Command benchmark: issued -> CommandCompleted latency at a steady command rate across a fleet
of gRPC devices.

    .venv/bin/python tests/bench/bench_commands.py [--devices 1000] [--commands-per-s 200]
        [--seconds 30] [--path gateway|kafka] [--rate 0] [--heartbeat 5]

Starts, in a fresh namespace against `labbus services up`'s broker: the gRPC gateway
(`labbus gateway grpc`), the device processor (`labbus process devices`) and one simulator
process with N device streams (mutual TLS, heartbeats every --heartbeat s, which they register
as their interval, so the processor holds them ONLINE; readings at --rate/s each, none by
default). Once every device is ONLINE it issues `measure` commands round-robin over the devices
at a steady rate (open loop: each at its scheduled time, whatever the earlier ones are doing),
through the gateway's SendCommand with an operator certificate (`--path gateway`, how operators
send them) or straight to Kafka as `labbus command send` does (`--path kafka`). A consumer in
this process reads lab.commands; a command's latency is from its scheduled issue time to the
moment its final event (completed / failed / rejected / timed out) was read here. Only commands
issued in the measured window count (after --warmup s of the same rate).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from aiokafka import TopicPartition  # noqa: E402

from labbus.deploy import commands as cmds  # noqa: E402
from labbus.events import faust_runtime, kafka, pki  # noqa: E402
from labbus.events.codec import DecodeError, default_codec  # noqa: E402
from labbus.events.model import COMMAND_FINAL, command_id_for  # noqa: E402
from labbus.events.runtime import Step  # noqa: E402
from labbus.events.topics import COMMANDS, DEVICE_STATUS, topic_name  # noqa: E402
from labbus.processors import lifecycle as lifecycle_processor  # noqa: E402
from labbus.producers.gateway import devices as dev  # noqa: E402
from labbus.producers.gateway import gctune  # noqa: E402
from labbus.producers.gateway import labbus_gateway_pb2 as pb  # noqa: E402
from labbus.producers.gateway import labbus_gateway_pb2_grpc as pb_grpc  # noqa: E402
from tests.bench.gwfleet import Namespace, PeakRss, Simulators, cpu_s, machine, pct  # noqa: E402

OPERATOR = "bench-operator"
PAYLOAD = {"spectrophotometer": {"wavelength_nm": 600}}  # the others' measure: {} is valid
STAGES = ("lab.command.CommandIssued", "lab.command.CommandDispatched",
          "lab.command.CommandAccepted", "lab.command.CommandStarted")


def _sim_worker(conn, devices: int, rate: float, heartbeat_s: float, pki_dir: str, target: str,
                part: int, parts: int) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_simulate(conn, devices, rate, heartbeat_s, Path(pki_dir), target, part, parts))


async def _simulate(conn, devices, rate, heartbeat_s, pki_dir, target, part, parts) -> None:
    loop = asyncio.get_running_loop()
    stats = dev.Stats()
    fleet = dev.make_fleet(devices, rate, stats, prefix="bench",
                           heartbeat_s=heartbeat_s)[part::parts]
    creds = {d.device_id: dev.credentials(pki_dir, d.device_id) for d in fleet}
    gctune.tune()  # as run_fleet (labbus agent sim --grpc) does
    stop = asyncio.Event()
    runners = [asyncio.create_task(d.run(target, pki_dir, stop, creds=creds[d.device_id]))
               for d in fleet]
    try:
        while sum(d.connected.is_set() for d in fleet) < len(fleet):
            await asyncio.sleep(0.2)
        conn.send("connected")
        await loop.run_in_executor(None, conn.recv)  # the end
    finally:
        stop.set()
        await asyncio.gather(*runners, return_exceptions=True)
        conn.send({"commands_completed": stats.commands_completed,
                   "errors": dict(stats.errors), "reconnects": stats.reconnects})


class Watcher:
    """Reads lab.commands and lab.devices.status of the namespace from the beginning: which
    devices are ONLINE, and when each command's events were read here (wall clock)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.online: set[str] = set()
        self.seen: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.final: dict[str, tuple[str, str, float, float]] = {}  # type, reason, read, logged
        self.watch_status = True

    async def run(self, stop: asyncio.Event) -> None:
        codec = default_codec()
        commands, status = topic_name(self.cfg, COMMANDS), topic_name(self.cfg, DEVICE_STATUS)
        consumer = kafka.consumer(self.cfg, group=None, fetch_max_wait_ms=20)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topics
            tps = [TopicPartition(t, p) for t in (commands, status)
                   for p in sorted(consumer.partitions_for_topic(t) or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            paused = False
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for tp, records in batch.items():
                    for r in records:
                        try:
                            e = codec.decode(r.value)
                        except DecodeError:
                            continue
                        if tp.topic == status:
                            if e.TYPE == "lab.device.DeviceStatusChanged":
                                (self.online.add if e.status == "ONLINE"
                                 else self.online.discard)(e.device_id)
                            continue
                        if e.TYPE in COMMAND_FINAL:
                            if e.command_id not in self.final:
                                self.final[e.command_id] = (
                                    e.TYPE.rsplit(".", 1)[-1],
                                    getattr(e, "reason_code", "") or "", now, r.timestamp / 1000)
                        else:
                            self.seen[e.command_id].setdefault(e.TYPE, now)
                if not self.watch_status and not paused:
                    consumer.pause(*[tp for tp in tps if tp.topic == status])  # heartbeats
                    paused = True
        finally:
            await consumer.stop()


class Issuer:
    """Issues command k to device k mod N at its scheduled time, via the gateway or Kafka."""

    def __init__(self, ns: Namespace, target: str, devices: list, path: str,
                 timeout_s: float) -> None:
        self.ns, self.target, self.devices, self.path = ns, target, devices, path
        self.timeout_s = timeout_s
        self.issued: dict[str, float] = {}  # command id -> scheduled issue time (wall clock)
        self.returned: dict[str, float] = {}  # -> SendCommand returned / broker acked
        self.lag: list[float] = []  # actual start of the call - scheduled time
        self.errors: collections.Counter = collections.Counter()
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self):
        if self.path == "gateway":
            self.channel = dev.channel(self.target, self.ns.pki_dir, OPERATOR)
            self.stub = pb_grpc.GatewayStub(self.channel)
            await self.channel.channel_ready()
        else:
            self.producer = kafka.producer(self.ns.cfg)
            await self.producer.start()
            self.step = Step(self.ns.cfg, "bench")
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.path == "gateway":
            await self.channel.close()
        else:
            await self.producer.stop()

    async def _one(self, k: int, scheduled: float, key: str) -> None:
        d = self.devices[k % len(self.devices)]
        payload = PAYLOAD.get(d.device_type, {})
        self.lag.append(time.time() - scheduled)
        try:
            if self.path == "gateway":
                await self.stub.SendCommand(pb.SendCommandRequest(
                    device_id=d.device_id, command_type="measure", payload_json=json.dumps(payload),
                    timeout_s=self.timeout_s, idempotency_key=key), timeout=60)
            else:
                event = cmds.issued_event(d.device_id, "measure", payload, self.timeout_s, key,
                                          issued_by=f"bench/{OPERATOR}")
                out = self.step.encode(event)
                await (await self.producer.send(out.topic, out.value, key=out.key))
            self.returned[command_id_for(d.device_id, key)] = time.time()
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            self.errors[type(exc).__name__] += 1

    async def issue(self, first: int, seconds: float, per_s: float) -> list[str]:
        """Commands first.. at per_s for seconds; returns their ids."""
        ids = []
        start = time.time()
        n = int(seconds * per_s)
        for i in range(n):
            scheduled = start + i / per_s
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            k = first + i
            key = f"bench-{k}"
            cid = command_id_for(self.devices[k % len(self.devices)].device_id, key)
            self.issued[cid] = scheduled
            ids.append(cid)
            t = asyncio.create_task(self._one(k, scheduled, key))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        return ids


def _ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(pct(values, 0.5) * 1000, 1),
            "p95": round(pct(values, 0.95) * 1000, 1), "p99": round(pct(values, 0.99) * 1000, 1),
            "max": round(max(values) * 1000, 1)}


async def main(args) -> dict:
    ns = Namespace.create("bench-cmd", args.devices)
    pki.issue_cert(ns.pki_dir, OPERATOR, role="operator")
    cfg = ns.cfg
    await kafka.ensure_topics(cfg)
    gw, target = ns.start_gateway()
    lifecycle = ns.start("process", "devices")
    rss = PeakRss(gw.pid)
    rss.start()
    stop = asyncio.Event()
    watcher = Watcher(cfg)
    watching = asyncio.create_task(watcher.run(stop))
    sims = Simulators(_sim_worker, (args.devices, args.rate, args.heartbeat, str(ns.pki_dir),
                                    target), 1)
    fleet = dev.make_fleet(args.devices, args.rate, dev.Stats(), prefix="bench")
    finals, load = [], {}
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(sims.each(), 180)
        while len(watcher.online) < args.devices:
            if time.perf_counter() - t0 > 240:
                raise RuntimeError(f"only {len(watcher.online)} of {args.devices} ONLINE")
            if watching.done():
                watching.result()
            await asyncio.sleep(0.2)
        ready_s = time.perf_counter() - t0
        watcher.watch_status = False
        print(f"{args.devices} devices connected and ONLINE in {ready_s:.1f} s; issuing "
              f"{args.commands_per_s:g}/s via {args.path}, {args.warmup:g} s warm-up + "
              f"{args.seconds:g} s measured", file=sys.stderr)
        load["before"] = round(os.getloadavg()[0], 1)
        async with Issuer(ns, target, fleet, args.path, args.command_timeout) as issuer:
            warm = await issuer.issue(0, args.warmup, args.commands_per_s)
            pids = {"gateway": gw.pid, "devices_processor": lifecycle.pid,
                    "simulator": sims.procs[0].pid, "bench": os.getpid()}
            cpu0 = {k: cpu_s(p) for k, p in pids.items()}
            psutil.cpu_percent()
            w0 = time.perf_counter()
            measured = await issuer.issue(len(warm), args.seconds, args.commands_per_s)
            window = time.perf_counter() - w0
            cpu1 = {k: cpu_s(p) for k, p in pids.items()}
            machine_cpu = psutil.cpu_percent()
            load["end_of_window"] = round(os.getloadavg()[0], 1)
        deadline = time.monotonic() + args.command_timeout + 15
        while (time.monotonic() < deadline
               and any(c not in watcher.final for c in measured)):
            await asyncio.sleep(0.5)
        finals = await asyncio.wait_for(sims.each("end"), 60)
    finally:
        stop.set()
        await asyncio.gather(watching, return_exceptions=True)
        sims.join()
        rss.stopped.set()
        for p in (gw, lifecycle):
            p.terminate()
        for p in (gw, lifecycle):
            try:
                p.wait(30)
            except Exception:  # noqa: BLE001
                p.kill()
        await kafka.delete_namespace_topics(cfg, ns.name)
        shutil.rmtree(faust_runtime.data_dir(cfg, lifecycle_processor.PROCESS),
                      ignore_errors=True)
    outcomes = collections.Counter()
    rejected = collections.Counter()
    lat, lat_completed = [], []
    stage = {s: [] for s in STAGES}
    returned, logged_to_read = [], []
    for cid in measured:
        t = issuer.issued[cid]
        if cid in issuer.returned:
            returned.append(issuer.returned[cid] - t)
        for s in STAGES:
            if s in watcher.seen.get(cid, {}):
                stage[s].append(watcher.seen[cid][s] - t)
        f = watcher.final.get(cid)
        if f is None:
            outcomes["no_final_state"] += 1
            continue
        kind, reason, read, logged = f
        outcomes[kind] += 1
        if reason:
            rejected[reason] += 1
        lat.append(read - t)
        logged_to_read.append(read - logged)
        if kind == "CommandCompleted":
            lat_completed.append(read - t)
    return {
        "devices": args.devices, "path": args.path, "commands_per_s_asked": args.commands_per_s,
        "commands_per_s_issued": round(len(measured) / window, 1), "window_s": round(window, 1),
        "readings_per_s_per_device": args.rate, "heartbeat_s": args.heartbeat,
        "devices_online_after_s": round(ready_s, 1),
        "commands_measured": len(measured), "outcomes": dict(outcomes),
        "rejected_reasons": dict(rejected), "issue_errors": dict(issuer.errors),
        "issued_to_completed_read_ms": _ms(lat_completed),
        "issued_to_final_read_ms": _ms(lat),
        "breakdown_from_issue_ms": {
            "issue_call_returned": _ms(returned),
            **{f"{name.rsplit('.', 1)[1]}_read": _ms(stage[name]) for name in STAGES},
            "final_read": _ms(lat),
            "final_logged_to_read": _ms(logged_to_read),
            "issue_start_lag": _ms(issuer.lag[len(warm):]),
        },
        "cpu_percent": {k: round(100 * (cpu1[k] - cpu0[k]) / window) for k in pids},
        "machine_cpu_percent_of_both_cores": round(machine_cpu),
        "gateway_peak_rss_mb": round(rss.peak / 2**20),
        "simulator": {"commands_completed": sum(f["commands_completed"] for f in finals),
                      "errors": {k: v for f in finals for k, v in f["errors"].items()},
                      "reconnects": sum(f["reconnects"] for f in finals)},
        "load_average_1m": load, "machine": machine(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--commands-per-s", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--path", choices=("gateway", "kafka"), default="gateway",
                        help="SendCommand with an operator certificate, or straight to Kafka")
    parser.add_argument("--rate", type=float, default=0.0, help="readings/s per device")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval, s")
    parser.add_argument("--command-timeout", type=float, default=30.0)
    a = parser.parse_args()
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(main(a)), indent=2))
