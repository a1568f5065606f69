"""Generate a real OT-2 Python protocol (Protocol API v2) for one batch of colour-mixing recipes.

Pure text generation: nothing here imports opentrons, so it is cheap to import anywhere.
The generated file is self-contained (no imports beyond ``opentrons.protocol_api``), so the
same bytes can be simulated in-process (``producers.ot2.simulate``) or uploaded to a robot
(``producers.ot2.robot_http``); ``protocol_hash`` identifies those bytes.

Liquid handling, per batch:

* the reservoir holds one well per dye plus one for water (``DeckLayout.source_wells``);
* water is dispensed first, then each dye, each source with ONE tip for the whole batch
  (``tip_policy="per_source"``, default) or a fresh tip per transfer (``"per_transfer"``);
* volumes above the pipette's max are split into equal chunks; 0 µL entries are skipped;
* dispenses happen at the top of the destination well followed by a blow-out there, so a
  reused tip never touches liquid already in the well (no carry-back into the stock).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

API_LEVEL = "2.28"  # max supported by opentrons 9.0.0 (protocols.api_support.definitions)
ROBOT_TYPE = "OT-2"

TIPRACK = "opentrons_96_tiprack_300ul"
RESERVOIR = "nest_12_reservoir_15ml"
PLATE = "corning_96_wellplate_360ul_flat"
PIPETTE = "p300_single_gen2"

PIPETTE_MAX_UL = 300.0
PLATE_WELL_MAX_UL = 360.0
RESERVOIR_WELL_MAX_UL = 15000.0
TIPS_PER_RACK = 96

WATER = "water"
PLATE_WELLS = tuple(f"{r}{c}" for c in range(1, 13) for r in "ABCDEFGH")  # column-major
RESERVOIR_WELLS = tuple(f"A{c}" for c in range(1, 13))

TipPolicy = Literal["per_source", "per_transfer"]


class WellRecipe(NamedTuple):
    """What goes into one plate well: µL of each dye plus µL of water."""

    well: str
    dyes: Mapping[str, float]
    water: float = 0.0


@dataclass(frozen=True)
class DeckLayout:
    """Where things sit on the OT-2 deck (slots 1-11) and how much extra stock to declare."""

    tiprack_slots: tuple[int, ...] = (1,)
    reservoir_slot: int = 2
    plate_slot: int = 3
    pipette_mount: Literal["left", "right"] = "right"
    # Extra µL declared in each reservoir well beyond what the batch needs (dead volume).
    reservoir_margin_ul: float = 1000.0
    liquid_colors: Mapping[str, str] = field(default_factory=dict)

    def source_wells(self, dyes: Sequence[str]) -> dict[str, str]:
        """Reservoir well of each source: dyes in the given order from A1, water after them."""
        names = [*dyes, WATER]
        if len(names) > len(RESERVOIR_WELLS):
            raise ValueError(f"{len(dyes)} dyes + water do not fit the 12-well reservoir")
        return dict(zip(names, RESERVOIR_WELLS, strict=False))


_DEFAULT_COLORS = {"red": "#E53935", "green": "#43A047", "blue": "#1E88E5",
                   "yellow": "#FDD835", "cyan": "#00ACC1", "magenta": "#D81B60",
                   "black": "#212121", WATER: "#B3E5FC"}


class _Transfer(NamedTuple):
    source: str
    well: str
    volume: float


def plan_transfers(recipes: Sequence[WellRecipe], dyes: Sequence[str]) -> list[_Transfer]:
    """Validated transfer list in execution order (water first, then dyes in order)."""
    dye_set = set(dyes)
    if len(dye_set) != len(dyes):
        raise ValueError(f"duplicate dye names: {list(dyes)}")
    if WATER in dye_set:
        raise ValueError(f"{WATER!r} is reserved for the diluent")
    seen: set[str] = set()
    for r in recipes:
        if r.well not in PLATE_WELLS:
            raise ValueError(f"unknown plate well {r.well!r}")
        if r.well in seen:
            raise ValueError(f"well {r.well} appears twice in the batch")
        seen.add(r.well)
        unknown = set(r.dyes) - dye_set
        if unknown:
            raise ValueError(f"well {r.well}: dyes {sorted(unknown)} not in {list(dyes)}")
        vols = [*r.dyes.values(), r.water]
        if any(not math.isfinite(v) or v < 0 for v in vols):
            raise ValueError(f"well {r.well}: volumes must be finite and >= 0, got {vols}")
        if sum(vols) > PLATE_WELL_MAX_UL:
            raise ValueError(f"well {r.well}: {sum(vols)} µL exceeds {PLATE_WELL_MAX_UL} µL")
    out: list[_Transfer] = []
    for source in [WATER, *dyes]:
        for r in recipes:
            v = r.water if source == WATER else float(r.dyes.get(source, 0.0))
            if v > 0:
                out.append(_Transfer(source, r.well, float(v)))
    return out


def _chunks(volume: float) -> list[float]:
    n = max(1, math.ceil(volume / PIPETTE_MAX_UL - 1e-9))
    return [round(volume / n, 3)] * n


def generate_protocol(
    recipes: Sequence[WellRecipe],
    dyes: Sequence[str],
    layout: DeckLayout | None = None,
    *,
    tip_policy: TipPolicy = "per_source",
    protocol_name: str = "labbus colour mixing batch",
) -> str:
    """Return the text of an OT-2 Python protocol that prepares ``recipes`` on one plate.

    Deterministic: the same arguments always give the same bytes (and ``protocol_hash``).
    Raises ValueError for anything the robot would reject or that cannot fit the deck.
    """
    layout = layout or DeckLayout()
    transfers = plan_transfers(recipes, dyes)
    sources = layout.source_wells(dyes)
    slots = [*layout.tiprack_slots, layout.reservoir_slot, layout.plate_slot]
    if len(set(slots)) != len(slots) or not all(1 <= s <= 11 for s in slots):
        raise ValueError(f"deck slots must be distinct and within 1-11: {slots}")

    per_source_total: dict[str, float] = {s: 0.0 for s in sources}
    for t in transfers:
        per_source_total[t.source] += t.volume
    stock: dict[str, float] = {}
    for s, need in per_source_total.items():
        vol = round(need + layout.reservoir_margin_ul, 3)
        if vol > RESERVOIR_WELL_MAX_UL:
            raise ValueError(f"{s}: {vol} µL needed exceeds a {RESERVOIR_WELL_MAX_UL} µL "
                             f"reservoir well")
        stock[s] = vol

    if tip_policy == "per_source":
        steps: list[tuple[str, list[tuple[str, float]]]] = []
        for t in transfers:
            if not steps or steps[-1][0] != t.source:
                steps.append((t.source, []))
            steps[-1][1].append((t.well, t.volume))
    elif tip_policy == "per_transfer":
        steps = [(t.source, [(t.well, t.volume)]) for t in transfers]
    else:
        raise ValueError(f"unknown tip_policy {tip_policy!r}")
    tips_available = TIPS_PER_RACK * len(layout.tiprack_slots)
    if len(steps) > tips_available:
        raise ValueError(f"{len(steps)} tips needed but only {tips_available} loaded; "
                         "add tiprack slots or use tip_policy='per_source'")

    colors = {**_DEFAULT_COLORS, **layout.liquid_colors}
    liquids = [
        {"name": s, "well": w, "volume": stock[s], "color": colors.get(s, "#9E9E9E")}
        for s, w in sources.items()
    ]
    plate_wells = [r.well for r in recipes]
    plan = [[sources[src], [[w, _chunks(v)] for w, v in items]] for src, items in steps]

    def lit(obj: object) -> str:  # JSON literals are valid Python for str/float/list/dict
        return json.dumps(obj, ensure_ascii=True)

    return f'''"""{protocol_name}: {len(recipes)} wells, sources {lit([*dyes, WATER])}.

Generated by labbus producers.ot2.protocol; do not edit by hand.
"""
from opentrons import protocol_api

metadata = {{
    "protocolName": {lit(protocol_name)},
    "author": "labbus",
    "description": "Closed-loop colour mixing batch (generated)",
}}
requirements = {{"robotType": {lit(ROBOT_TYPE)}, "apiLevel": {lit(API_LEVEL)}}}

TIPRACK_SLOTS = {lit([str(s) for s in layout.tiprack_slots])}
RESERVOIR_SLOT = {lit(str(layout.reservoir_slot))}
PLATE_SLOT = {lit(str(layout.plate_slot))}
PIPETTE_MOUNT = {lit(layout.pipette_mount)}
# name, reservoir well, declared stock volume (uL), display colour
LIQUIDS = {lit(liquids)}
PLATE_WELLS = {lit(plate_wells)}
# [reservoir well, [[plate well, [aspirate/dispense chunk volumes (uL)]], ...]]: one tip per step
PLAN = {lit(plan)}


def run(protocol: protocol_api.ProtocolContext) -> None:
    tipracks = [protocol.load_labware({lit(TIPRACK)}, slot) for slot in TIPRACK_SLOTS]
    reservoir = protocol.load_labware({lit(RESERVOIR)}, RESERVOIR_SLOT, label="dye stocks")
    plate = protocol.load_labware({lit(PLATE)}, PLATE_SLOT, label="mix plate")
    pipette = protocol.load_instrument({lit(PIPETTE)}, PIPETTE_MOUNT, tip_racks=tipracks)

    for liquid in LIQUIDS:
        defined = protocol.define_liquid(
            name=liquid["name"],
            description=liquid["name"] + " stock",
            display_color=liquid["color"],
        )
        reservoir.load_liquid(wells=[liquid["well"]], volume=liquid["volume"], liquid=defined)
    plate.load_empty(PLATE_WELLS)

    for source_well, destinations in PLAN:
        source = reservoir[source_well]
        pipette.pick_up_tip()
        for plate_well, chunks in destinations:
            destination = plate[plate_well]
            for volume in chunks:
                pipette.aspirate(volume, source)
                pipette.dispense(volume, destination.top(-2))
                pipette.blow_out()
        pipette.drop_tip()
'''


def protocol_hash(text: str) -> str:
    """SHA-256 hex digest of the protocol text (UTF-8); the identity of a generated protocol."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
