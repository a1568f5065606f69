"""Validators change while readings stream in: a second one joins and the first leaves; or the
only one is killed with kill -9 and restarted. Every reading still gets exactly one decision
(redeliveries repeat the same event id)."""

import os
import signal
import threading

from events.codec import default_codec
from events.topics import MEASUREMENTS_VALIDATED, topic_name
from producers import sim
from tests.conftest import read_topic, run, wait_for

READINGS = 24_000
RATE = 2_000.0


def decisions(cfg, prefix: str) -> list:
    codec = default_codec()
    return [codec.decode_record(r.value, plain=True)[1]
            for r in run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_VALIDATED)))
            if r.key.decode().startswith(prefix)]


def test_rebalance_mid_stream_loses_and_invents_nothing(cfg, processes):
    simulator = sim.FleetSimulator(sim.make_fleet(12, seed=9, prefix="rbl"), seed=9)
    published = {}
    publisher = threading.Thread(target=lambda: published.update(
        summary=run(sim.publish(cfg, simulator, READINGS, rate=RATE, track_ids=True))))
    publisher.start()
    first = processes.start("process", "validate")
    wait_for(lambda: len(decisions(cfg, "rbl")) > 2_000, 90, "the first validator at work")
    second = processes.start("process", "validate", extra_env={"LABBUS_LOG_LEVEL": "INFO"})
    wait_for(lambda: "dedup windows primed" in open(second.log_path).read(), 90,
             "partitions assigned to the second validator")
    done_before = len(decisions(cfg, "rbl"))
    wait_for(lambda: len(decisions(cfg, "rbl")) > done_before + 2_000, 90,
             "both validators at work")
    first.terminate()  # leaves the group: its partitions move to the second validator
    first.wait(30)
    publisher.join(60)
    summary = published["summary"]
    assert summary.good == READINGS

    def all_decided():
        got = decisions(cfg, "rbl")
        return got if len({d["causation_id"] for d in got}) >= READINGS else None

    got = wait_for(all_decided, 120, "a decision for every reading")
    assert {str(d["causation_id"]) for d in got} == {str(i) for i in summary.good_ids}
    by_id = {}
    for d in got:
        by_id.setdefault(d["event_id"], set()).add(d["causation_id"])
    assert len(by_id) == READINGS, "a reading was decided twice under different ids"
    assert all(len(causes) == 1 for causes in by_id.values())


def test_kill_9_mid_stream_loses_nothing(cfg, processes):
    """After kill -9 and a restart every reading has its one decision (some twice, under the
    same id): nothing committed was left undecided."""
    simulator = sim.FleetSimulator(sim.make_fleet(12, seed=11, prefix="k9v"), seed=11)
    published = {}
    publisher = threading.Thread(target=lambda: published.update(
        summary=run(sim.publish(cfg, simulator, READINGS, rate=RATE, track_ids=True))))
    publisher.start()
    validator = processes.start("process", "validate")
    wait_for(lambda: len(decisions(cfg, "k9v")) > 4_000, 90, "the validator at work")
    os.kill(validator.pid, signal.SIGKILL)
    validator.wait()
    assert len(decisions(cfg, "k9v")) < READINGS, "killed too late to test anything"
    processes.start("process", "validate")
    publisher.join(60)
    summary = published["summary"]

    def all_decided():
        got = decisions(cfg, "k9v")
        return got if len({d["causation_id"] for d in got}) >= READINGS else None

    got = wait_for(all_decided, 180, "a decision for every reading after the restart")
    assert {str(d["causation_id"]) for d in got} == {str(i) for i in summary.good_ids}
    assert len({d["event_id"] for d in got}) == READINGS
