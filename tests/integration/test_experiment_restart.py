"""Restart time of the experiment processor with 10,000 finished campaigns in the log.

What grows with history, and what a restarted processor reads of it:
- the input topics (requests, runs, readings): nothing — it resumes at its committed offsets;
- the `campaigns` Table's changelog: one update per input event of every campaign, but the topic
  is compacted and a settled campaign's key is deleted (a tombstone), so after cleaning it holds
  the running campaigns plus the updates not yet cleaned (the active segment: about the last
  minute, segment.ms=60000; tombstones stay for delete.retention.ms=60000);
- the `scored-wells` GlobalTable's changelog: one record per scored well, compacted to the ring
  (RING slots per dye set and partition).

The test writes the log as it stands after the cleaner has run: 10,000 requests and verdicts on
lab.experiments with the group's offsets committed at their end, nothing left of them in the
campaigns changelog and full rings in the scored-wells one, plus every update of the last TAIL
campaigns uncleaned (each a real campaign state, ~3 KB, then the tombstone). Then it starts a
processor, publishes a new request and times how long until its RecipesProposed is on the log;
the same with an empty log, for comparison."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from labbus.events import config, kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    ExperimentCompleted,
    ExperimentRequested,
    RecipesProposed,
    RobotRunRequested,
)
from labbus.events.topics import (
    COLOUR_READINGS,
    EXPERIMENTS,
    QUOTA_INBOX,
    ROBOT_RUNS,
    USERS,
    group_id,
    topic_name,
)
from labbus.processors import campaign, experiment
from tests.conftest import LABBUS, REPO, free_port
from tests.integration.test_experiment_instances import answers, requests, wait_stable

CAMPAIGNS = 10_000
# campaigns whose every update is still in the changelog's uncleaned segment: those finished in
# about the last minute (segment.ms); 20 a minute is a busy lab (an OT-2 campaign takes minutes).
# With 100 the restart measured 5.4 s here (recovery 1.9 s of it).
TAIL = int(os.environ.get("LABBUS_RESTART_TAIL", "20"))
LIMIT_S = 5.0


def changelog(cfg, table: str) -> str:
    return f"{group_id(cfg, experiment.PROCESS)}-{table}-changelog"


def state_history(req: ExperimentRequested) -> list[dict]:
    """Every table value a real campaign goes through, request to verdict."""
    c, out = campaign.start(req)
    states = [campaign.to_state(c)]
    while True:
        runs = [e for e in out if isinstance(e, RobotRunRequested)]
        if not runs:
            break
        out = []
        for event in answers(runs[0]):
            if event.TYPE.endswith("WellColourMeasured"):
                out += campaign.on_reading(c, event, 1)
            else:
                out += campaign.on_run_finished(c, event)
            states.append(campaign.to_state(c))
    assert campaign.settled(c)
    return states


async def build_history(cfg) -> dict[str, int]:
    """The log of 10,000 finished campaigns, as the log cleaner leaves it (module docstring)."""
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    parts = list(range(experiment.PARTITIONS))
    partition_of = DefaultPartitioner()
    template = requests(1, "restart-template")[0]
    history = state_history(template)
    producer = kafka.producer(cfg, linger_ms=20)
    await producer.start()
    counts = {"inputs": 0, "campaigns": 0, "scored-wells": 0}
    try:
        futures = []
        rings: dict[int, int] = {p: 0 for p in parts}
        for i in range(CAMPAIGNS):
            xid = f"done-{i:05d}"
            key = xid.encode()
            p = partition_of(key, parts, parts)
            req = ExperimentRequested.create(
                source="test", subject=xid, sequence=1, experiment_id=xid, target_hex=None,
                target_lab=list(template.target_lab), dyes=list(template.dyes),
                budget_wells=48, batch_size=8, tolerance_de=2.0, requested_by="test")
            done = ExperimentCompleted.create(
                source="experiment", subject=xid, sequence=9, experiment_id=xid,
                best_well="A1", best_volumes={"red": 10.0}, best_de=1.0, wells_used=16,
                reason="test")
            for event in (req, done):
                futures.append(await producer.send(topic_name(cfg, EXPERIMENTS),
                                                   codec.encode(event), key=key, partition=p))
                counts["inputs"] += 1
            values = []  # a cleaned changelog keeps nothing of a settled campaign
            if i >= CAMPAIGNS - TAIL:  # not cleaned yet: every update, then the tombstone
                values = [json.dumps({"campaign": {**s, "experiment_id": xid}},
                                     separators=(",", ":")).encode() for s in history]
                values.append(None)
            for v in values:
                futures.append(await producer.send(
                    changelog(cfg, "campaigns"), v, key=json.dumps(xid).encode(), partition=p))
                counts["campaigns"] += 1
            wells = 16 if i >= CAMPAIGNS - TAIL else 0  # the ring's older writes are cleaned
            for w in range(wells):
                seq = rings[p]
                rings[p] += 1
                slot = f"{experiment.dye_set(template.dyes)}|{p}|{seq % experiment.RING}"
                value = [seq, 1000 + i, xid, f"W{w}", [[d, 10 + 20 * k] for k, d in
                                                        enumerate(template.dyes)],
                         [100, 120, 140]]
                futures.append(await producer.send(
                    changelog(cfg, "scored-wells"), json.dumps(value).encode(),
                    key=json.dumps(slot).encode(), partition=p))
                counts["scored-wells"] += 1
            if len(futures) > 5000:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    # the processor had handled all of it: its offsets are at the ends of its inputs
    committer = kafka.consumer(cfg, group=group_id(cfg, experiment.PROCESS))
    await committer.start()
    try:
        tps = [TopicPartition(topic_name(cfg, spec), p)
               for spec in (EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS) for p in parts]
        ends = await committer.end_offsets(tps)
        committer.assign(tps)
        await committer.commit({tp: end for tp, end in ends.items()})
    finally:
        await committer.stop()
    return counts


async def time_to_first_proposal(cfg, env: dict, logdir) -> float:
    """Start a processor, publish a request at once; seconds until its RecipesProposed."""
    req = requests(1, f"restart-new-{time.time_ns()}")[0]
    codec = default_codec()
    await kafka.ensure_topics(cfg)
    watcher = kafka.consumer(cfg, group=None)
    await watcher.start()
    tps = [TopicPartition(topic_name(cfg, EXPERIMENTS), p) for p in range(EXPERIMENTS.partitions)]
    watcher.assign(tps)
    await watcher.seek_to_end(*tps)
    for tp in tps:
        await watcher.position(tp)
    log = open(logdir / f"experiment-{req.experiment_id}.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen([LABBUS, "process", "experiment", "--metrics-port", str(free_port())],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        producer = kafka.producer(cfg)
        await producer.start()
        await producer.send_and_wait(topic_name(cfg, EXPERIMENTS), codec.encode(req),
                                     key=req.key)
        await producer.stop()
        while time.monotonic() - started < 120:
            batch = await watcher.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    e = codec.decode(r.value)  # a private namespace: no junk
                    if isinstance(e, RecipesProposed) and e.experiment_id == req.experiment_id:
                        return time.monotonic() - started
            assert proc.poll() is None, "the processor exited"
        raise AssertionError("no RecipesProposed within 120 s")
    finally:
        await watcher.stop()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_quota(cfg, env: dict, logdir) -> subprocess.Popen:
    """The quota processor, once it has joined its group (its first start creates topics)."""
    proc = subprocess.Popen([LABBUS, "process", "quota", "--metrics-port", str(free_port())],
                            env=env, stdout=open(logdir / f"quota-{time.time_ns()}.log", "w"),
                            stderr=subprocess.STDOUT, cwd=REPO)
    asyncio.run(wait_stable(cfg, 1, process="quota"))
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def commit_ends(cfg, process: str, specs) -> None:
    """A group's offsets at the ends of these topics (the history is not its to handle)."""
    committer = kafka.consumer(cfg, group=group_id(cfg, process))
    await committer.start()
    try:
        tps = [TopicPartition(topic_name(cfg, spec), p) for spec in specs
               for p in range(spec.partitions)]
        ends = await committer.end_offsets(tps)
        committer.assign(tps)
        await committer.commit({tp: end for tp, end in ends.items()})
    finally:
        await committer.stop()


def test_restart_with_10000_finished_campaigns_decides_within_5_s(env, tmp_path):
    ns = env["LABBUS_NAMESPACE"] + "-restart"
    mine = {**env, "LABBUS_NAMESPACE": ns}
    cfg = config.load(mine)
    # this namespace's topics and, on the secured broker, its ACLs (as admin) before any process
    # of it starts
    asyncio.run(kafka.ensure_topics(cfg))
    # campaigns start once the quota processor reserved their budget: it runs beside, started
    # before the clock (what is measured is the experiment processor's start)
    quota = start_quota(cfg, mine, tmp_path)
    try:
        # the processor creates its changelog topics (and their compaction settings) itself
        empty = asyncio.run(time_to_first_proposal(cfg, mine, tmp_path))
        stop(quota)
        started = time.monotonic()
        counts = asyncio.run(build_history(cfg))
        built = time.monotonic() - started
        asyncio.run(commit_ends(cfg, "quota", (EXPERIMENTS, USERS, QUOTA_INBOX)))
        quota = start_quota(cfg, mine, tmp_path)
        restarted = asyncio.run(time_to_first_proposal(cfg, mine, tmp_path))
        print(f"\nhistory: {CAMPAIGNS} finished campaigns ({counts['inputs']} input events, "
              f"{counts['campaigns']} campaign-table records, {counts['scored-wells']} "
              f"scored-well records; built in {built:.1f} s)")
        print(f"start to first RecipesProposed: {restarted:.2f} s with that history, "
              f"{empty:.2f} s with an empty log")
        assert restarted < LIMIT_S, restarted
    finally:
        stop(quota)
        asyncio.run(kafka.delete_namespace_topics(cfg, ns))
        shutil.rmtree(experiment.faust_runtime.data_dir(cfg, experiment.PROCESS),
                      ignore_errors=True)
