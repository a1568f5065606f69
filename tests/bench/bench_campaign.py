"""Campaign benchmark: wall time of simulated colour campaigns through the whole event pipeline.

    .venv/bin/python tests/bench/bench_campaign.py [--budget 96] [--batch 8] [--seeds 0,1,2]

For each scenario, in a fresh namespace (so no campaign learns from another): the experiment
processor, the OT-2 agent (`--simulate`, opentrons' Protocol Engine in-process) and the simulated
plate reader run as separate `labbus` processes against the services of `labbus services up`;
one ExperimentRequested is published and the clock runs until its verdict is in the log.

Scenarios: a hard target, the colour of a feasible recipe with a tolerance no replicate mean plus
its noise margin gets under (ΔE00 < 0.2), so it never completes: it spends the whole budget or,
when the model comes to judge the tolerance out of reach, gives up after half of it (seed 2 spends
all 96 wells); a target outside the dyes' gamut (given up once the closest colour is confirmed,
after half the budget); a reachable target. A campaign is repeatable: the request id, and with it
every well's camera noise, is fixed by scenario and seed.
Printed per scenario: wells used, the final measured ΔE00 (what the loop saw) and true ΔE00
(noise-free colour of the chosen recipe), wall time from request to verdict, and the simulation
time of each robot run (RobotRunStarted -> RobotRunFinished).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy import experiment as exp  # noqa: E402
from labbus.deploy.demo import LABBUS  # noqa: E402 - the installed `labbus` next to this Python
from labbus.deploy.local import services  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
from labbus.events.codec import DecodeError, default_codec  # noqa: E402
from labbus.events.model import (  # noqa: E402
    ExperimentCompleted,
    RobotRunFinished,
    RobotRunStarted,
    WellScored,
)
from labbus.events.topics import EXPERIMENTS, ROBOT_RUNS, topic_name  # noqa: E402
from labbus.processors.colour.scoring import delta_e2000  # noqa: E402
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab  # noqa: E402
from tests.bench.bench_pipeline import stop_processes  # noqa: E402

DYES = ["red", "yellow", "blue"]
REACHABLE = "#759e8f"  # the camera's colour of 40 µL red + 30 µL yellow + 60 µL blue
SCENARIOS = [  # name, target, tolerance ΔE00
    ("hard: tolerance inside the noise", REACHABLE, 0.2),
    ("unreachable: outside the gamut", "#7a3cc0", 2.0),
    ("reachable", REACHABLE, 2.0),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_all(cfg: config.Config, topic: str, key: bytes) -> list:
    codec = default_codec()
    out = []
    async for record in kafka.read_to_end(cfg, topic):
        if record.key != key:
            continue
        try:
            out.append(codec.decode(record.value))
        except DecodeError:
            continue
    return out


def true_de(volumes: dict[str, float], target_lab: list[float]) -> float:
    rgb = np.asarray(PlateReaderModel(seed=None).true_rgb(volumes)) * 255.0
    return float(delta_e2000(rgb_to_lab(rgb), np.asarray(target_lab)))


def run_scenario(base_env: dict[str, str], name: str, target: str, tolerance: float,
                 budget: int, batch: int, seed: int, logdir: Path) -> dict:
    namespace = f"bench-campaign-{uuid.uuid4().hex[:6]}"
    env = {**base_env, "LABBUS_NAMESPACE": namespace, "LABBUS_LOG_LEVEL": "WARNING"}
    cfg = config.load(env)
    asyncio.run(kafka.ensure_topics(cfg))
    procs = []
    for args in (("process", "experiment"), ("process", "quota"), ("agent", "ot2", "--simulate"),
                 ("agent", "reader")):
        log = open(logdir / f"{namespace}-{'-'.join(args[:2])}.log", "w")
        procs.append(subprocess.Popen([LABBUS, *args, "--metrics-port", str(free_port())],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        time.sleep(3)  # let the three consumers join before the clock starts
        req = exp.request(target, budget=budget, batch=batch, dyes=DYES, tolerance=tolerance,
                          experiment_id=f"bench-{seed}", requested_by="bench")
        # A request id fixed by scenario and seed fixes the camera noise of every well (the
        # reader seeds it from the dispensed event's id), so a rerun repeats the campaign.
        req = dataclasses.replace(req, envelope=dataclasses.replace(
            req.envelope, event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{name}/{seed}")))
        started = time.monotonic()
        asyncio.run(exp.publish(cfg, req))
        final = asyncio.run(exp.watch(cfg, req.experiment_id, lambda e: None, timeout_s=900))
        wall = time.monotonic() - started
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a labbus process exited with {p.returncode}; see {logdir}")
        if final is None:
            raise SystemExit(f"{name}: no verdict within 900 s; see {logdir}")
    finally:
        stop_processes({" ".join(map(str, p.args[1:3])): p for p in procs})
    key = req.experiment_id.encode()
    events = asyncio.run(read_all(cfg, topic_name(cfg, EXPERIMENTS), key))
    runs = asyncio.run(read_all(cfg, topic_name(cfg, ROBOT_RUNS), key))
    scored = [e for e in events if isinstance(e, WellScored)]
    if isinstance(final, ExperimentCompleted):
        volumes = final.best_volumes
    else:
        volumes = min(scored, key=lambda e: e.delta_e).volumes if scored else None
    run_started = {e.run_id: e.envelope.occurred_at for e in runs if isinstance(e, RobotRunStarted)}
    sim = [(e.envelope.occurred_at - run_started[e.run_id]).total_seconds()
           for e in runs if isinstance(e, RobotRunFinished) and e.run_id in run_started]
    return dict(name=name, target=target, tolerance=tolerance, verdict=type(final).__name__,
                reason=final.reason, seed=seed,
                wells=final.wells_used, measured_de=final.best_de,
                true_de=None if volumes is None else true_de(volumes, req.target_lab),
                wall=wall, runs=len(sim), sim=sim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2,3",
                    help="comma-separated: one campaign per scenario and "
                    "seed, each with its own camera noise")
    args = ap.parse_args()
    base_env = dict(os.environ)
    services.up(config.load(base_env), echo=lambda m: print(m, file=sys.stderr))
    logdir = Path(tempfile.mkdtemp(prefix="bench-campaign-"))
    results = []
    for (name, target, tol), seed in itertools.product(SCENARIOS, map(int, args.seeds.split(","))):
        r = run_scenario(base_env, name, target, tol, args.budget, args.batch, seed, logdir)
        results.append(r)
        sim = r["sim"]
        print(f"{r['name']} ({r['target']}, seed {seed}, tolerance {r['tolerance']:g}): "
              f"{r['verdict']}, {r['wells']} wells, measured ΔE00 {r['measured_de']:.2f}, "
              f"true ΔE00 {r['true_de']:.2f}, wall {r['wall']:.1f} s, {r['runs']} robot runs: "
              f"simulation mean {statistics.mean(sim):.2f} s, max {max(sim):.2f} s, "
              f"total {sum(sim):.1f} s\n"
              f"  ({r['reason']})", flush=True)
    print("\n| scenario | verdict | wells | measured ΔE00 | true ΔE00 | wall s | robot runs | "
          "sim s per run (mean / max) | sim share of wall |\n" + "|---" * 9 + "|")
    for r in results:
        print(f"| {r['name']} (`{r['target']}`, tol {r['tolerance']:g}, seed {r['seed']}) | "
              f"{r['verdict']} | "
              f"{r['wells']} | {r['measured_de']:.2f} | {r['true_de']:.2f} | {r['wall']:.1f} | "
              f"{r['runs']} | {statistics.mean(r['sim']):.2f} / {max(r['sim']):.2f} | "
              f"{sum(r['sim']) / r['wall']:.0%} |")
    print(f"\nlogs: {logdir}")


if __name__ == "__main__":
    main()
