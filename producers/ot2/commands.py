"""Plain-data view of Protocol Engine commands, shared by simulation and robot mode.

A command dict has exactly the keys in ``COMMAND_KEYS`` (the Protocol Engine command model
as served by the robot's ``GET /runs/{id}/commands/{commandId}``), JSON-ready values only
(timestamps are ISO-8601 strings). Nothing here imports opentrons.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COMMAND_KEYS = ("id", "key", "commandType", "intent", "status", "params", "result", "error",
                "createdAt", "startedAt", "completedAt", "notes", "failedCommandId")
TERMINAL_COMMAND_STATUSES = frozenset({"succeeded", "failed"})
TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "stopped"})

Command = dict[str, Any]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended (simulated or on the robot).

    ``errors`` are the run-level ErrorOccurrence dicts (engine state summary / ``GET /runs/{id}``).
    """

    status: str  # 'succeeded' | 'failed' | 'stopped'
    commands: int  # commands streamed (succeeded + failed)
    errors: list[dict[str, Any]] = field(default_factory=list)
    liquids: list[dict[str, Any]] = field(default_factory=list)  # [{id, displayName, ...}]
    # The engine's own final command list; only filled with simulate_run(keep_engine_commands=True).
    engine_commands: list[Command] | None = None

    @property
    def error_detail(self) -> str | None:
        """The first error's detail, the innermost wrapped one when there is a chain."""
        if not self.errors:
            return None
        err = self.errors[0]
        while err.get("wrappedErrors"):
            err = err["wrappedErrors"][0]
        return err.get("detail")


def normalize_command(raw: Mapping[str, Any]) -> Command:
    """Fixed key set and order, missing keys as None (the robot omits some None fields)."""
    cmd = {k: raw.get(k) for k in COMMAND_KEYS}
    if cmd["notes"] is None:
        cmd["notes"] = []
    return cmd


def labware_ids(commands: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """labwareId -> {"loadName", "slotName"} from succeeded loadLabware commands."""
    out: dict[str, dict[str, str]] = {}
    for c in commands:
        if (c.get("commandType") == "loadLabware" and c.get("status") == "succeeded"
                and c.get("result")):
            loc = c["params"].get("location") or {}
            out[c["result"]["labwareId"]] = {
                "loadName": c["params"].get("loadName"),
                "slotName": loc.get("slotName") if isinstance(loc, dict) else None,
            }
    return out


def find_labware_id(commands: Iterable[Mapping[str, Any]], load_name: str) -> str:
    """The id of the one labware loaded with ``load_name`` (ValueError if none or several)."""
    ids = [i for i, info in labware_ids(commands).items() if info["loadName"] == load_name]
    if len(ids) != 1:
        raise ValueError(f"expected exactly one {load_name!r} labware, found {ids}")
    return ids[0]


def dispensed_wells(
    commands: Iterable[Mapping[str, Any]],
    plate_labware_id: str,
    source_names: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """What actually reached each well of the plate: ``{well: {source: µL}}``.

    Walks succeeded liquid-handling commands in order, tracking per pipette what the tip
    holds (by source ``labwareId``/``wellName``); each dispense into ``plate_labware_id``
    is attributed to the tip's contents (proportionally if a tip holds several sources).
    Sources are named by reservoir well name, or ``source_names[wellName]`` when given.
    Failed commands moved nothing and are ignored.
    """
    names = dict(source_names or {})
    held: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in commands:
        if c.get("status") != "succeeded":
            continue
        kind, p = c.get("commandType"), c.get("params") or {}
        pip = p.get("pipetteId", "")
        if kind == "aspirate" and p.get("labwareId") != plate_labware_id:
            src = names.get(p.get("wellName"), p.get("wellName"))
            held[pip][src] += float(p["volume"])
        elif kind == "dispense":
            vol = float(p["volume"])
            tip = held[pip]
            total = sum(tip.values())
            if p.get("labwareId") == plate_labware_id and total > 0:
                for src, v in list(tip.items()):
                    out[p["wellName"]][src] += vol * v / total
            if total > 0:
                scale = max(total - vol, 0.0) / total
                for src in list(tip):
                    tip[src] *= scale
        elif kind in ("pickUpTip", "dropTip", "dropTipInPlace", "blowout", "blowOutInPlace"):
            held[pip].clear()  # fresh tip, or leftovers gone (blown out where the tip stood)
    return {w: {s: round(v, 6) for s, v in srcs.items()} for w, srcs in out.items()}


def liquid_sources(
    commands: Iterable[Mapping[str, Any]], liquids: Iterable[Mapping[str, Any]]
) -> dict[str, str]:
    """wellName -> liquid displayName for wells given a liquid by ``loadLiquid`` commands.

    ``liquids`` is the run's liquid list (``RunOutcome.liquids`` or ``GET /runs/{id}``
    ``data.liquids``: ``[{"id", "displayName", ...}]``). Feed it to ``dispensed_wells`` as
    ``source_names``. The plate's ``EMPTY`` pseudo-liquid is skipped.
    """
    names = {liq["id"]: liq["displayName"] for liq in liquids}
    out: dict[str, str] = {}
    for c in commands:
        if c.get("commandType") == "loadLiquid" and c.get("status") == "succeeded":
            liquid_id = c["params"]["liquidId"]
            if liquid_id in names:
                for well in c["params"]["volumeByWell"]:
                    out[well] = names[liquid_id]
    return out
