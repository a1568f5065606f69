"""MongoDB read models: one document per device (metadata, latest value per metric, counts) and
one per colour-mixing experiment (target, status, iterations with their proposals, wells with
recipe, reading and ΔE, and per robot run its status and command counts by type and status).

A batch's documents and the projection's positions are written in one multi-document
transaction, after checking that the stored positions are the ones this projector last read or
wrote (PositionsMoved otherwise, as in the PostgreSQL view). Each document also records, per
partition, the next offset it has absorbed, and an update only applies events past it, so a
replay is a no-op even where transactions are not available.

A validator that crashes or loses partitions re-emits some decisions: the same event again, at a
new offset. So measurement ids are remembered (collection `measurements_seen`, written after the
device documents, kept SEEN_TTL_S) and a repeat is absorbed without being counted again.

A transaction whose client died (kill -9, a connection cut mid-batch) is not aborted by the
server when the connection closes: it keeps its documents' write locks until the server reaps it
(transactionLifetimeLimitSeconds, 60 s by default on MongoDB and SecantusDB), and every write of
a restarted projector meets a WriteConflict until then. So the projector writes its transactions
in one logical session at a time, whose id it records (collection `projector_sessions`, one
document per projection), and kills (`killSessions`) the recorded sessions of its earlier runs
when it starts, and its own session after a failed transaction: what such a transaction holds is
released at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime

import pymongo
from aiokafka import TopicPartition
from pymongo import MongoClient, UpdateOne
from pymongo.errors import OperationFailure

from labbus.events import model as m
from labbus.events.config import Config
from labbus.events.model import DeviceRegistered, MeasurementValidated
from labbus.events.runtime import Fence, Positioned
from labbus.events.topics import (
    COLOUR_READINGS,
    DEVICES,
    EXPERIMENTS,
    MEASUREMENTS_VALIDATED,
    ROBOT_RUNS,
    topic_name,
)

log = logging.getLogger(__name__)

SEEN_TTL_S = 7 * 24 * 3600  # re-emissions follow their original within minutes
# a session is replaced after this long (servers expire sessions idle for 30 min by default)
SESSION_RENEW_S = 600
STOP_TIMEOUT_S = 2.0  # what stopping may spend on the server


def _datetime(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1e6, UTC)


class MongoProjection:
    name = "mongo"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client: MongoClient | None = None
        self.session = None  # the ClientSession transactions are written in (module docstring)
        self._session_at = 0.0
        self._failed: list = []  # sessions of failed transactions, killed before the next
        self._repeats: set = set()  # of the batch being applied
        self.fence = Fence()
        self.aliases = {topic_name(cfg, DEVICES): "devices",
                        topic_name(cfg, MEASUREMENTS_VALIDATED): "validated",
                        topic_name(cfg, EXPERIMENTS): "experiments",
                        topic_name(cfg, ROBOT_RUNS): "runs",
                        topic_name(cfg, COLOUR_READINGS): "readings"}

    def topics(self) -> list[str]:
        return list(self.aliases)

    @property
    def db(self):
        return self.client[self.cfg.mongo_db]

    async def start(self) -> None:
        if self.client is None:
            self.client = MongoClient(self.cfg.mongo_url, serverSelectionTimeoutMS=10000,
                                      tz_aware=True)
        try:
            await asyncio.to_thread(self.client.admin.command, "ping")
        except Exception as exc:
            raise ConnectionError(
                f"MongoDB at LABBUS_MONGO_URL={self.cfg.mongo_url} does not answer: {exc}") from exc
        await asyncio.to_thread(self.db.devices.create_index, "device_type")
        await asyncio.to_thread(self.db.measurements_seen.create_index, "at",
                                expireAfterSeconds=SEEN_TTL_S)
        await asyncio.to_thread(self.db.experiments.create_index, "status")
        await asyncio.to_thread(self._take_over)

    async def stop(self) -> None:
        if self.client is not None:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Within STOP_TIMEOUT_S: with the server unreachable, ending the session and closing
        the client (endSessions) would each wait the server selection timeout (10 s)."""
        with pymongo.timeout(STOP_TIMEOUT_S):
            try:
                self._end_session()
            except Exception:  # noqa: BLE001 - the server may be down; recorded ids are killed
                pass  # by the next start
            self.client.close()

    # -- sessions (module docstring) -----------------------------------------------------------

    def _take_over(self) -> None:
        """Kill the sessions earlier runs of this projection recorded: a transaction one of them
        left open (a process killed mid-batch) would hold its documents' locks for a minute. A
        second projector of the same view running now (the positions fence refuses its batches
        anyway) has its current transaction aborted once, retries and records its session
        again."""
        doc = self.db.projector_sessions.find_one({"_id": self.name}) or {}
        self._kill([], list(doc.get("lsids", [])))

    def _kill(self, sessions: list, lsids: list) -> None:
        """killSessions on `sessions` (ClientSessions of this process, ended afterwards: their
        ids go back to the driver's pool only once nothing is left open in them) and `lsids`
        (recorded ids), then no longer recorded."""
        lsids = lsids + [s.session_id["id"] for s in sessions]
        if lsids:
            try:
                self.client.admin.command("killSessions", [{"id": lsid} for lsid in lsids])
            except OperationFailure as exc:  # not allowed (some hosted tiers): wait it out
                log.warning("killSessions refused; a transaction a crashed run left open "
                            "blocks writes until the server reaps it",
                            extra={"error": repr(exc)})
            self.db.projector_sessions.update_one({"_id": self.name},
                                                  {"$pullAll": {"lsids": lsids}})
        for session in sessions:
            session.end_session()

    def _session(self):
        """The session of the next transaction: the current one, or a new one, recorded."""
        if self.session is not None and time.monotonic() - self._session_at > SESSION_RENEW_S:
            self._end_session()
        if self._failed:
            self._kill(self._failed, [])
            self._failed = []
        if self.session is None:
            session = self.client.start_session()
            self.db.projector_sessions.update_one(
                {"_id": self.name}, {"$addToSet": {"lsids": session.session_id["id"]}},
                upsert=True)
            self.session, self._session_at = session, time.monotonic()
        return self.session

    def _end_session(self) -> None:
        """After a committed transaction nothing is left open in it: ended, no longer recorded."""
        if self.session is None:
            return
        session, self.session = self.session, None
        lsid = session.session_id["id"]
        session.end_session()
        self.db.projector_sessions.update_one({"_id": self.name}, {"$pull": {"lsids": lsid}})

    async def positions(self) -> dict[TopicPartition, int]:
        docs = await asyncio.to_thread(
            lambda: list(self.db.projection_positions.find({"projection": self.name})))
        stored = {TopicPartition(d["topic"], d["partition"]): d["next_offset"] for d in docs}
        self.fence.believed = dict(stored)
        return stored

    async def apply(self, events: list[Positioned],
                    next_offsets: dict[TopicPartition, int]) -> None:
        await asyncio.to_thread(self._apply, events, next_offsets)

    def _apply(self, events: list[Positioned], next_offsets: dict[TopicPartition, int]) -> None:
        """Documents and positions in one multi-document transaction."""
        session = self._session()
        try:
            with session.start_transaction():
                self._write(session, events, next_offsets)  # the runtime retries what is transient
        except BaseException:
            # the transaction may be open on the server still (the connection was cut before
            # the abort reached it): its session is killed before the next transaction
            self._failed.append(session)
            self.session = None
            raise
        self.fence.believed.update(next_offsets)

    def _check_positions(self, session, next_offsets: dict[TopicPartition, int]) -> None:
        """The positions about to be written must be what this projector last read or wrote (a
        partition it has not seen yet is not checked); a concurrent writer conflicts on them."""
        known = self.fence.known(next_offsets)
        if not known:
            return
        docs = self.db.projection_positions.find(
            {"_id": {"$in": [self._position_id(tp) for tp in known]}}, session=session)
        self.fence.check(known, {TopicPartition(d["topic"], d["partition"]): d["next_offset"]
                                 for d in docs})

    def _position_id(self, tp: TopicPartition) -> str:
        return f"{self.name}:{tp.topic}:{tp.partition}"

    def _write(self, session, events: list[Positioned],
               next_offsets: dict[TopicPartition, int]) -> None:
        self._check_positions(session, next_offsets)
        measurement_ids = [p.record["measurement_id"] for p in events
                           if p.event_type == MeasurementValidated.TYPE]
        self._repeats = self._repeated(session, events, measurement_ids)
        by_device: dict[str, list[Positioned]] = defaultdict(list)
        by_experiment: dict[str, list[Positioned]] = defaultdict(list)
        for p in events:
            if p.event_type in (DeviceRegistered.TYPE, MeasurementValidated.TYPE):
                by_device[p.record["device_id"]].append(p)
            elif p.event_type in _EXPERIMENT_UPDATES:
                by_experiment[p.record["experiment_id"]].append(p)
        for collection, grouped, update in ((self.db.devices, by_device, self._update),
                                            (self.db.experiments, by_experiment,
                                             self._experiment_update)):
            if not grouped:
                continue
            absorbed = {d["_id"]: d.get("pos", {}) for d in collection.find(
                {"_id": {"$in": list(grouped)}}, {"pos": 1}, session=session)}
            ops = [update(key, items, absorbed.get(key, {})) for key, items in grouped.items()]
            ops = [op for op in ops if op is not None]
            if ops:
                collection.bulk_write(ops, ordered=False, session=session)
        if measurement_ids:  # after the documents: a crash in between is covered by their pos
            now = datetime.now(UTC)
            self.db.measurements_seen.bulk_write(
                [UpdateOne({"_id": mid}, {"$setOnInsert": {"at": now}}, upsert=True)
                 for mid in set(measurement_ids)], ordered=False, session=session)
        if not next_offsets:
            return
        self.db.projection_positions.bulk_write([
            UpdateOne({"_id": self._position_id(tp)},
                      {"$set": {"projection": self.name, "topic": tp.topic,
                                "partition": tp.partition, "next_offset": nxt}}, upsert=True)
            for tp, nxt in next_offsets.items()], session=session)

    def _repeated(self, session, events: list[Positioned], measurement_ids: list[str]) -> set:
        """(partition, offset) of measurements counted before: in an earlier batch, or earlier in
        this one."""
        if not measurement_ids:
            return set()
        known = {d["_id"] for d in self.db.measurements_seen.find(
            {"_id": {"$in": list(set(measurement_ids))}}, {"_id": 1}, session=session)}
        repeats = set()
        for p in events:
            if p.event_type != MeasurementValidated.TYPE:
                continue
            mid = p.record["measurement_id"]
            if mid in known:
                repeats.add((p.tp, p.offset))
            known.add(mid)
        return repeats

    def _fresh(self, items: list[Positioned],
               absorbed: dict) -> tuple[list[Positioned], dict[str, int]]:
        """The events a document has not absorbed yet (by its per-partition positions), and the
        positions it will have absorbed after them."""
        fresh, last = [], {}
        for p in items:
            slot = f"{self.aliases[p.tp.topic]}_{p.tp.partition}"
            if p.offset < absorbed.get(slot, 0):
                continue  # already absorbed before a restart
            last[slot] = p.offset + 1
            fresh.append(p)
        return fresh, last

    def _update(self, device: str, items: list[Positioned], absorbed: dict) -> UpdateOne | None:
        sets: dict = {}
        incs: dict = defaultdict(int)
        fresh, last = self._fresh(items, absorbed)
        for p in fresh:
            r = p.record
            if p.event_type == DeviceRegistered.TYPE:
                sets.update({"device_type": r["device_type"], "model": r["model"],
                             "location": r["location"], "metrics": r["metrics"],
                             "attributes": r["attributes"],
                             "registered_at": _datetime(r["occurred_at"])})
            elif (p.tp, p.offset) not in self._repeats:
                sets[f"latest.{r['metric']}"] = {"value": r["value"], "unit": r["unit"],
                                                 "measured_at": _datetime(r["measured_at"]),
                                                 "measurement_id": r["measurement_id"]}
                incs[f"counts.{r['metric']}"] += 1
                incs["total_measurements"] += 1
        if not last:
            return None
        sets.update({f"pos.{slot}": nxt for slot, nxt in last.items()})
        update = {"$set": sets}
        if incs:
            update["$inc"] = dict(incs)
        return UpdateOne({"_id": device}, update, upsert=True)

    def _experiment_update(self, experiment: str, items: list[Positioned],
                           absorbed: dict) -> UpdateOne | None:
        """One experiment's events of a batch, in log order, folded into one update. The fields an
        event sets are its own (events of three topics arrive in any relative order); counters
        are guarded, like the device counts, by the document's per-partition positions."""
        u = _Update()
        fresh, last = self._fresh(items, absorbed)
        for p in fresh:
            _EXPERIMENT_UPDATES[p.event_type](u, p.record)
        if not last:
            return None
        u.sets.update({f"pos.{slot}": nxt for slot, nxt in last.items()})
        for field in u.sets:  # a verdict's best ΔE in the same batch wins over the running min
            u.mins.pop(field, None)
        update: dict = {"$set": u.sets}
        if u.incs:
            update["$inc"] = dict(u.incs)
        if u.mins:
            update["$min"] = u.mins
        return UpdateOne({"_id": experiment}, update, upsert=True)


class _Update:
    def __init__(self) -> None:
        self.sets: dict = {}
        self.incs: dict = defaultdict(int)
        self.mins: dict = {}

    def min(self, field: str, value: float) -> None:
        self.mins[field] = min(value, self.mins.get(field, value))


def _field(name: str) -> str:
    """A value usable as a key in a dotted path."""
    return str(name).replace(".", "_").replace("$", "_") or "_"


def _requested(u: _Update, r: dict) -> None:
    u.sets.update({"target": {"hex": r["target_hex"], "lab": r["target_lab"]},
                   "dyes": r["dyes"], "budget_wells": r["budget_wells"],
                   "batch_size": r["batch_size"], "tolerance_de": r["tolerance_de"],
                   "requested_by": r["requested_by"], "requested_at": _datetime(r["occurred_at"])})
    u.sets["status"] = "running"  # a verdict comes later in the same partition


def _ended(status: str):
    def apply(u: _Update, r: dict) -> None:
        u.sets.update({"status": status, "reason": r["reason"],
                       "finished_at": _datetime(r["occurred_at"])})
        for key in ("wells_used", "best_well", "best_volumes", "best_de"):
            if r.get(key) is not None:
                u.sets[key] = r[key]
    return apply


def _proposed(u: _Update, r: dict) -> None:
    u.sets[f"iterations.{r['iteration']}"] = {
        "iteration": r["iteration"], "recipes": r["recipes"], "predicted_de": r["predicted_de"],
        "note": r["note"], "proposed_at": _datetime(r["occurred_at"])}
    for recipe in r["recipes"]:
        well = f"wells.{_field(recipe['well'])}"
        u.sets.update({f"{well}.iteration": r["iteration"], f"{well}.volumes": recipe["volumes"],
                       f"{well}.water_ul": recipe["water_ul"]})


def _recipe_rejected(u: _Update, r: dict) -> None:
    u.sets[f"rejected_batches.{r['iteration']}"] = r["reasons"]


def _scored(u: _Update, r: dict) -> None:
    u.sets[f"wells.{_field(r['well'])}.delta_e"] = r["delta_e"]
    u.min("best_de", r["delta_e"])


def _measured(u: _Update, r: dict) -> None:
    well = f"wells.{_field(r['well'])}"
    u.sets.update({f"{well}.rgb": r["rgb"], f"{well}.lab": r["lab"],
                   f"{well}.instrument_id": r["instrument_id"]})


def _dispensed(u: _Update, r: dict) -> None:
    well = f"wells.{_field(r['well'])}"
    u.sets.update({f"{well}.run_id": r["run_id"], f"{well}.dispensed": r["volumes"]})


def _run(status: str, **fields):
    def apply(u: _Update, r: dict) -> None:
        run = f"runs.{_field(r['run_id'])}"
        u.sets[f"{run}.iteration"] = r["iteration"]
        u.sets[f"{run}.status"] = status  # a run's events are ordered in one partition
        for name, source in fields.items():
            u.sets[f"{run}.{name}"] = r[source]
    return apply


def _command(u: _Update, r: dict) -> None:
    run = f"runs.{_field(r['run_id'])}"
    u.incs[f"{run}.command_types.{_field(r['command_type'])}"] += 1
    u.incs[f"{run}.command_statuses.{_field(r['status'])}"] += 1


_EXPERIMENT_UPDATES = {
    m.ExperimentRequested.TYPE: _requested,
    m.ExperimentRejected.TYPE: _ended("rejected"),
    m.ExperimentCompleted.TYPE: _ended("completed"),
    m.ExperimentFailed.TYPE: _ended("failed"),
    m.ExperimentCancelled.TYPE: _ended("cancelled"),
    m.RecipesProposed.TYPE: _proposed,
    m.RecipeRejected.TYPE: _recipe_rejected,
    m.WellScored.TYPE: _scored,
    m.WellColourMeasured.TYPE: _measured,
    m.WellDispensed.TYPE: _dispensed,
    m.RobotRunRequested.TYPE: _run("requested", protocol_hash="protocol_hash"),
    m.RobotRunStarted.TYPE: _run("running", mode="mode"),
    m.RobotRunFinished.TYPE: _run("succeeded", commands="commands", wells="wells"),
    m.RobotRunFailed.TYPE: _run("failed", error="error"),
    m.RobotCommandExecuted.TYPE: _command,
}
