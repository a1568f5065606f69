"""kill -9 the Mongo projector mid-stream: per-device counts still equal the log."""

import os
import signal
from collections import Counter

from pymongo import MongoClient

from labbus.events.topics import MEASUREMENTS_VALIDATED, topic_name
from tests.conftest import read_topic, run, wait_for
from tests.integration.test_projector_crash import publish_validated

N = 8_000  # 20 batches of 400; SecantusDB writes ~5x slower than PostgreSQL here


def test_kill_9_mongo_projector_neither_loses_nor_double_counts(own_cfg, processes):
    # a namespace of its own: in the session's, the projector first catches up on every earlier
    # test's events
    cfg = own_cfg
    member = {"LABBUS_GROUP_INSTANCE_ID": "mcrash-projector-0"}  # static: a restart takes over
    run(publish_validated(cfg, N, prefix="mcrash", resend=N // 4))  # re-emitted decisions too
    devices = MongoClient(cfg.mongo_url)[cfg.mongo_db].devices
    mine = {"_id": {"$regex": "^mcrash-"}}

    def counted() -> int:
        return sum(d.get("total_measurements", 0) for d in devices.find(mine))

    for threshold in (N // 6, N // 2):
        proc = processes.start("project", "mongo", "--batch", "400", extra_env=member)
        wait_for(lambda t=threshold: counted() >= t, 90, f"{threshold} readings counted")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    processes.start("project", "mongo", "--batch", "400", extra_env=member)
    end = len(run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_VALIDATED))))
    positions = MongoClient(cfg.mongo_url)[cfg.mongo_db].projection_positions
    validated = {"projection": "mongo", "topic": topic_name(cfg, MEASUREMENTS_VALIDATED)}
    wait_for(lambda: sum(d["next_offset"] for d in positions.find(validated)) >= end, 120,
             "the whole topic absorbed after restart, re-emitted decisions included")
    by_device = Counter({d["_id"]: d["total_measurements"] for d in devices.find(mine)})
    assert by_device == Counter({f"mcrash-{i}": len(range(i, N, 17)) for i in range(17)})
