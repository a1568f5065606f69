"""MongoDB read model: one document per device (metadata, latest value per metric, counts).

Each document records, per partition, the next offset it has absorbed; an update only applies
events past that offset, so replays after a crash are no-ops. The projection's resume position is
written after the documents; reading back from an older position is harmless for the same reason.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timezone

from aiokafka import TopicPartition
from pymongo import MongoClient, UpdateOne

from events.config import Config
from events.model import DeviceRegistered, MeasurementValidated
from events.topics import DEVICES, MEASUREMENTS_VALIDATED, topic_name
from projections.runner import Positioned


def _datetime(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1e6, timezone.utc)


class MongoProjection:
    name = "mongo"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client: MongoClient | None = None
        self.aliases = {topic_name(cfg, DEVICES): "devices",
                        topic_name(cfg, MEASUREMENTS_VALIDATED): "validated"}

    def topics(self) -> list[str]:
        return list(self.aliases)

    @property
    def db(self):
        return self.client[self.cfg.mongo_db]

    async def start(self) -> None:
        self.client = MongoClient(self.cfg.mongo_url, serverSelectionTimeoutMS=10000, tz_aware=True)
        try:
            await asyncio.to_thread(self.client.admin.command, "ping")
        except Exception as exc:
            raise ConnectionError(
                f"MongoDB at LABBUS_MONGO_URL={self.cfg.mongo_url} does not answer: {exc}") from exc
        await asyncio.to_thread(self.db.devices.create_index, "device_type")

    async def stop(self) -> None:
        if self.client is not None:
            self.client.close()

    async def positions(self) -> dict[TopicPartition, int]:
        docs = await asyncio.to_thread(
            lambda: list(self.db.projection_positions.find({"projection": self.name})))
        return {TopicPartition(d["topic"], d["partition"]): d["next_offset"] for d in docs}

    async def apply(self, events: list[Positioned], next_offsets: dict[TopicPartition, int]) -> None:
        await asyncio.to_thread(self._apply, events, next_offsets)

    def _apply(self, events: list[Positioned], next_offsets: dict[TopicPartition, int]) -> None:
        by_device: dict[str, list[Positioned]] = defaultdict(list)
        for p in events:
            if p.event_type in (DeviceRegistered.TYPE, MeasurementValidated.TYPE):
                by_device[p.record["device_id"]].append(p)
        if by_device:
            absorbed = {d["_id"]: d.get("pos", {}) for d in self.db.devices.find(
                {"_id": {"$in": list(by_device)}}, {"pos": 1})}
            ops = [self._update(device, items, absorbed.get(device, {}))
                   for device, items in by_device.items()]
            ops = [op for op in ops if op is not None]
            if ops:
                self.db.devices.bulk_write(ops, ordered=False)
        self.db.projection_positions.bulk_write([
            UpdateOne({"_id": f"{self.name}:{tp.topic}:{tp.partition}"},
                      {"$set": {"projection": self.name, "topic": tp.topic,
                                "partition": tp.partition, "next_offset": nxt}}, upsert=True)
            for tp, nxt in next_offsets.items()])

    def _update(self, device: str, items: list[Positioned], absorbed: dict) -> UpdateOne | None:
        sets: dict = {}
        incs: dict = defaultdict(int)
        last: dict[str, int] = {}
        for p in items:
            slot = f"{self.aliases[p.tp.topic]}_{p.tp.partition}"
            if p.offset < absorbed.get(slot, 0):
                continue  # already absorbed before a restart
            last[slot] = p.offset + 1
            r = p.record
            if p.event_type == DeviceRegistered.TYPE:
                sets.update({"device_type": r["device_type"], "model": r["model"],
                             "location": r["location"], "metrics": r["metrics"],
                             "attributes": r["attributes"],
                             "registered_at": _datetime(r["occurred_at"])})
            else:
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
