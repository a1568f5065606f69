"""The labware rulebook of the OT-2 colour-mixing setup: one place for the plate, the pipette,
the tips and the reservoir, and for the rules every recipe, batch and protocol must obey.

The recipe validator (processors/colour/recipes.py and the campaign), the protocol generator
(events/ot2_protocol.py) and the plate picture (api/app.py) take every number and every order
from here. Plain frozen dataclasses and functions; the kernel imports none of the layers.

The setup (the one the protocol generator drives on opentrons 9, figures from the labware and
pipette definitions shipped with opentrons_shared_data):

* **Plate** ``corning_96_wellplate_360ul_flat``: 8 rows A-H x 12 columns, a well 10.67 mm deep,
  6.86 mm wide at the top and 6.35 mm at the bottom, 360 µL to the brim.
* **Well order: column-major** (A1, B1, ... H1, A2, ... H12). It is the order opentrons itself
  uses (``labware.wells()``, the definitions' ``ordering``, tip pick-up), the one in which the
  campaign allocates wells and the one the read models list them in; an 8-channel pipette works
  a column at a time. (The recipe validator used row-major before; nothing depended on it.)
* **Working volume 200 µL, and every well is filled to it** (water makes up the rest). 360 µL is
  the brim: Corning gives 75-200 µL as the working volume of its 360 µL flat-bottom plates, and
  the camera needs one liquid height in every well so that colour depends only on the recipe
  (the plate-reader model computes concentrations over 200 µL). It also keeps the tip dry: at
  200 µL the liquid stands about 6.0 mm high and the generator dispenses 2 mm below the top
  (8.67 mm), so a tip never touches the liquid in a well; a well filled past about 290 µL would
  wet it (``liquid_height_mm``). The protocol generator accepted up to 360 µL before while
  sharing a tip between wells, which broke that.
* **Pipette** ``p300_single_gen2`` with ``opentrons_96_tiprack_300ul`` tips: 20-300 µL per
  aspiration (its definition's minVolume/maxVolume). A transfer is 0 µL or at least 20 µL;
  below 20 µL the p300 is outside its specified range and accuracy, and opentrons does not stop
  it (the Protocol Engine runs a 10 µL p300 aspiration without complaint), so the rulebook must.
  A transfer above 300 µL is split into equal aspirations (``aspirations``), which with a 200 µL
  well never happens with this pipette.
* **Tip policy: one tip per source per run** (``per_source``): water first, then each dye, each
  with one fresh tip for every well of the batch, dispensed 2 mm below the well's top and blown
  out there. The tip never touches a well's liquid (see above), so it carries nothing back into a
  stock and nothing from well to well; it is opentrons' own default (``transfer(new_tip="once")``)
  and needs 4 tips for a batch of three dyes instead of up to 4 per well (384 per plate: four
  racks a campaign). ``per_transfer`` stays available for liquids that must not share a tip.
* **Reservoir** ``nest_12_reservoir_15ml``: 12 wells A1-A12 of 15 mL, **1 mL dead volume** each.
  The pipette aspirates 1 mm above a well's bottom (opentrons' default clearance); the V-shaped
  bottom 2 mm of a well hold about 0.7 mL and each further mm about 0.56 mL, so 1 mL keeps the
  tip about 1.5 mm under the surface when the stock runs low. A batch may use a stock's volume
  minus the dead volume.

What sits where on the deck is configuration, not a rule: a ``DeckLayout`` (which stock is in
which reservoir well and how much of it, the deck slots, the pipette mount), by default red,
yellow and blue dye in A1-A3 and water in A4, each well filled to its 15 mL (so a run may take
up to 14 mL of each, as the generator allowed before), tips in slot 1, reservoir in 2, plate in 3,
pipette on the right mount. ``LABBUS_DECK_LAYOUT`` points to a JSON file with another one
(``deck_from_json`` / events.config). Each run starts from full tip racks and the layout's stock
volumes: labbus does not track what earlier runs used; the operator replaces tips and tops up
stocks between runs. The stocks' spectra are unknown to labbus: the simulated plate reader keeps
its own (producers/plate_reader_model.py).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

WATER = "water"
TipPolicy = Literal["per_source", "per_transfer"]
TIP_POLICIES: tuple[str, ...] = ("per_source", "per_transfer")
DECK_SLOTS = range(1, 12)  # OT-2 deck slots 1-11 (12 is the trash)
Recipe = Mapping[str, float]  # dye stock -> µL; water tops the well up to Limits.total_ul


# -- labware ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plate:
    load_name: str = "corning_96_wellplate_360ul_flat"
    rows: str = "ABCDEFGH"
    columns: int = 12
    capacity_ul: float = 360.0        # to the brim (the definition's totalLiquidVolume)
    working_volume_ul: float = 200.0  # most a well may hold; every well is filled to it
    depth_mm: float = 10.668
    top_diameter_mm: float = 6.858
    bottom_diameter_mm: float = 6.35

    @property
    def size(self) -> int:
        return len(self.rows) * self.columns


@dataclass(frozen=True)
class Pipette:
    load_name: str = "p300_single_gen2"
    min_ul: float = 20.0
    max_ul: float = 300.0


@dataclass(frozen=True)
class TipRack:
    load_name: str = "opentrons_96_tiprack_300ul"
    tips: int = 96
    tip_ul: float = 300.0


@dataclass(frozen=True)
class Reservoir:
    load_name: str = "nest_12_reservoir_15ml"
    wells: tuple[str, ...] = tuple(f"A{c}" for c in range(1, 13))
    capacity_ul: float = 15000.0
    dead_volume_ul: float = 1000.0  # left in a well: the pipette cannot take it without air


@dataclass(frozen=True)
class Labware:
    """Everything on the deck that is not configuration, and how the pipette uses it."""

    plate: Plate = Plate()
    pipette: Pipette = Pipette()
    tiprack: TipRack = TipRack()
    reservoir: Reservoir = Reservoir()
    tip_policy: TipPolicy = "per_source"
    dispense_depth_mm: float = 2.0  # dispenses happen this far below the top of the well


LABWARE = Labware()
PLATE, PIPETTE, TIPRACK, RESERVOIR = (LABWARE.plate, LABWARE.pipette, LABWARE.tiprack,
                                      LABWARE.reservoir)


# -- plate geometry and well order ---------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def well_names(plate: Plate = PLATE) -> tuple[str, ...]:
    """Every well in the one order used everywhere: column-major, A1, B1, ... H1, A2, ... H12."""
    return tuple(f"{r}{c}" for c in range(1, plate.columns + 1) for r in plate.rows)


MAX_WELLS = len(well_names())  # one 96-well plate per campaign


def well_index(well: str, plate: Plate = PLATE) -> int:
    """Position of a well in `well_names` order; ValueError for a well not on the plate."""
    try:
        return well_names(plate).index(well)
    except ValueError:
        raise ValueError(well_violations(well, plate)[0]) from None


def well_position(well: str, plate: Plate = PLATE) -> tuple[int, int]:
    """(row index, column index), both from 0, of a well on the plate."""
    well_index(well, plate)
    return plate.rows.index(well[0]), int(well[1:]) - 1


def plate_rows(plate: Plate = PLATE) -> tuple[tuple[str, ...], ...]:
    """The wells as the plate lies on the deck: row A first, each row from column 1 (drawing)."""
    return tuple(tuple(f"{r}{c}" for c in range(1, plate.columns + 1)) for r in plate.rows)


def well_violations(well: str, plate: Plate = PLATE) -> list[str]:
    if isinstance(well, str) and well in well_names(plate):
        return []
    last = f"{plate.rows[-1]}{plate.columns}"
    return [f"well {well!r} is not on a {plate.size}-well plate (A1-{last})"]


def liquid_height_mm(volume_ul: float, plate: Plate = PLATE) -> float:
    """Height of `volume_ul` in a plate well (a truncated cone), from the well's bottom."""
    r0, r1, depth = plate.bottom_diameter_mm / 2, plate.top_diameter_mm / 2, plate.depth_mm

    def volume(h: float) -> float:  # µL = mm³
        r = r0 + (r1 - r0) * h / depth
        return math.pi * h / 3 * (r0 * r0 + r0 * r + r * r)

    low, high = 0.0, depth
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if volume(mid) < volume_ul else (low, mid)
    return (low + high) / 2


def labware_violations(labware: Labware = LABWARE) -> list[str]:
    """What is inconsistent in a rulebook itself (tested for the default one)."""
    reasons = []
    plate, pipette = labware.plate, labware.pipette
    if plate.working_volume_ul > plate.capacity_ul:
        reasons.append(f"working volume {plate.working_volume_ul:g} µL exceeds the plate well's "
                       f"{plate.capacity_ul:g} µL")
    if not 0 < pipette.min_ul <= pipette.max_ul <= labware.tiprack.tip_ul:
        reasons.append(f"pipette range {pipette.min_ul:g}-{pipette.max_ul:g} µL does not fit "
                       f"{labware.tiprack.tip_ul:g} µL tips")
    if labware.tip_policy not in TIP_POLICIES:
        reasons.append(f"unknown tip policy {labware.tip_policy!r}")
    surface = liquid_height_mm(plate.working_volume_ul, plate)
    dispense = plate.depth_mm - labware.dispense_depth_mm
    if labware.tip_policy == "per_source" and surface >= dispense:
        reasons.append(f"a full well's liquid ({surface:.1f} mm) reaches the dispense height "
                       f"({dispense:.1f} mm): a tip shared between wells would carry liquid")
    if not 0 <= labware.reservoir.dead_volume_ul < labware.reservoir.capacity_ul:
        reasons.append(f"dead volume {labware.reservoir.dead_volume_ul:g} µL does not fit a "
                       f"{labware.reservoir.capacity_ul:g} µL reservoir well")
    return reasons


# -- volumes, transfers and tips -------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What a campaign's recipe may be: the rulebook's numbers, plus the recipe policy (every well
    filled to `total_ul`, whole µL, the water top-up being a transfer too)."""

    total_ul: float = PLATE.working_volume_ul          # every well is filled to this volume
    working_volume_ul: float = PLATE.working_volume_ul  # most a well may hold
    min_transfer_ul: float = PIPETTE.min_ul
    max_transfer_ul: float = PIPETTE.max_ul
    water_is_pipetted: bool = True  # the water top-up obeys the pipette range too


DEFAULT_LIMITS = Limits()


def aspirations(volume_ul: float, pipette: Pipette = PIPETTE) -> list[float]:
    """One transfer as the pipette does it: equal aspirations of at most `pipette.max_ul`."""
    n = max(1, math.ceil(volume_ul / pipette.max_ul - 1e-9))
    return [round(volume_ul / n, 3)] * n


def transfer_violations(liquid: str, volume: float, limits: Limits = DEFAULT_LIMITS, *,
                        whole_ul: bool = True, split: bool = False) -> list[str]:
    """A single transfer: 0 or within the pipette's range. `split`: volumes above the maximum are
    allowed (they become several aspirations); `whole_ul`: the recipe policy of whole µL."""
    if not math.isfinite(volume):
        return [f"{liquid}: {volume} µL is not a number"]
    if volume < 0:
        return [f"{liquid}: {volume:g} µL is negative"]
    reasons = []
    if whole_ul and volume != int(volume):
        reasons.append(f"{liquid}: {volume:g} µL is not a whole number of µL")
    if 0 < volume < limits.min_transfer_ul:
        reasons.append(f"{liquid}: {volume:g} µL is below the pipette minimum "
                       f"{limits.min_transfer_ul:g} µL "
                       f"(use 0 or at least {limits.min_transfer_ul:g})")
    if not split and volume > limits.max_transfer_ul:
        reasons.append(f"{liquid}: {volume:g} µL is above the pipette maximum "
                       f"{limits.max_transfer_ul:g} µL")
    return reasons


def water_ul(recipe: Recipe, limits: Limits = DEFAULT_LIMITS) -> float:
    return limits.total_ul - sum(recipe.values())


def recipe_violations(recipe: Recipe, limits: Limits = DEFAULT_LIMITS,
                      dyes: Sequence[str] | None = None) -> list[str]:
    """Everything wrong with one recipe (dye -> µL, water making up `limits.total_ul`), as
    readable sentences; empty when it is fine."""
    reasons = []
    if dyes is not None:
        unknown = sorted(set(recipe) - set(dyes))
        if unknown:
            reasons.append(f"unknown dye(s) {', '.join(unknown)}; stocks are {', '.join(dyes)}")
    for dye, volume in recipe.items():
        reasons.extend(transfer_violations(dye, volume, limits))
    if limits.total_ul > limits.working_volume_ul:
        reasons.append(f"well total {limits.total_ul:g} µL exceeds the working volume "
                       f"{limits.working_volume_ul:g} µL")
    dye_total = sum(recipe.values())
    if dye_total > limits.total_ul:
        reasons.append(f"dyes add up to {dye_total:g} µL, "
                       f"more than the well total {limits.total_ul:g} µL")
    elif limits.water_is_pipetted and 0 < limits.total_ul - dye_total < limits.min_transfer_ul:
        reasons.append(f"water top-up of {limits.total_ul - dye_total:g} µL is below the pipette "
                       f"minimum {limits.min_transfer_ul:g} µL")
    return reasons


def contents(plan: Mapping[str, Recipe], limits: Limits = DEFAULT_LIMITS
             ) -> dict[str, dict[str, float]]:
    """well -> {liquid: µL} with the water top-up of each recipe made explicit."""
    return {well: {**recipe, WATER: water_ul(recipe, limits)} for well, recipe in plan.items()}


def transfers(plan: Mapping[str, Recipe],
              limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, str, float]]:
    """(well, liquid, µL) for every non-zero transfer, water included."""
    return [(well, liquid, volume) for well, liquids in contents(plan, limits).items()
            for liquid, volume in liquids.items() if volume > 0]


def demand(wells: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """µL of each liquid that filling `wells` (well -> {liquid: µL}) takes."""
    out: dict[str, float] = {}
    for liquids in wells.values():
        for liquid, volume in liquids.items():
            if volume > 0:
                out[liquid] = out.get(liquid, 0.0) + volume
    return out


def reservoir_demand(plan: Mapping[str, Recipe],
                     limits: Limits = DEFAULT_LIMITS) -> dict[str, float]:
    return demand(contents(plan, limits))


def tips_for(wells: Mapping[str, Mapping[str, float]],
             tip_policy: TipPolicy = LABWARE.tip_policy) -> int:
    """Tips that filling `wells` takes: one per liquid used (``per_source``) or one per
    non-zero transfer (``per_transfer``)."""
    if tip_policy == "per_source":
        return len(demand(wells))
    if tip_policy == "per_transfer":
        return sum(v > 0 for liquids in wells.values() for v in liquids.values())
    raise ValueError(f"unknown tip policy {tip_policy!r}; use one of {', '.join(TIP_POLICIES)}")


def tips_needed(plan: Mapping[str, Recipe], limits: Limits = DEFAULT_LIMITS,
                tip_policy: TipPolicy = LABWARE.tip_policy) -> int:
    return tips_for(contents(plan, limits), tip_policy)


def stock_violations(needed: Mapping[str, float], stocks_ul: Mapping[str, float],
                     dead_volume_ul: float = RESERVOIR.dead_volume_ul) -> list[str]:
    """Each liquid's demand against its reservoir well, which keeps `dead_volume_ul`."""
    reasons = []
    for liquid, need in sorted(needed.items()):
        if liquid not in stocks_ul:
            reasons.append(f"no reservoir holds {liquid}")
            continue
        available = stocks_ul[liquid] - dead_volume_ul
        if need > available:
            reasons.append(f"{liquid} reservoir: plan needs {need:g} µL "
                           f"but only {available:g} µL is "
                           f"usable ({stocks_ul[liquid]:g} µL minus "
                           f"{dead_volume_ul:g} µL dead volume)")
    return reasons


def tip_violations(tips: int, tips_available: int | None) -> list[str]:
    if tips_available is not None and tips > tips_available:
        return [f"plan needs {tips} tips but only {tips_available} are loaded"]
    return []


def plan_violations(plan: Mapping[str, Recipe], reservoirs_ul: Mapping[str, float], *,
                    dead_volume_ul: float = RESERVOIR.dead_volume_ul,
                    tips_available: int | None = None, limits: Limits = DEFAULT_LIMITS,
                    tip_policy: TipPolicy = LABWARE.tip_policy,
                    dyes: Sequence[str] | None = None, plate: Plate = PLATE) -> list[str]:
    """Everything wrong with filling `plan` (well -> recipe) from reservoirs holding
    `reservoirs_ul`, each keeping `dead_volume_ul` the pipette cannot reach."""
    reasons = []
    for well, recipe in plan.items():
        reasons.extend(well_violations(well, plate))
        reasons.extend(f"{well}: {reason}" for reason in recipe_violations(recipe, limits, dyes))
    wells = contents(plan, limits)
    reasons += stock_violations(demand(wells), reservoirs_ul, dead_volume_ul)
    reasons += tip_violations(tips_for(wells, tip_policy), tips_available)
    return reasons


class WellRecipe(NamedTuple):
    """What goes into one plate well: µL of each dye plus µL of water."""

    well: str
    dyes: Mapping[str, float]
    water: float = 0.0


def batch_violations(recipes: Sequence[WellRecipe], dyes: Sequence[str], deck: DeckLayout,
                     labware: Labware = LABWARE, tip_policy: TipPolicy | None = None
                     ) -> list[str]:
    """The physical rules for one robot run (explicit µL of every liquid in every well, volumes
    need not be whole): wells on the plate and each once, dyes on the deck, each transfer 0 or
    at least the pipette minimum (larger than its maximum: split), each well within the working
    volume, each stock enough above its dead volume, enough tips."""
    reasons = []
    tip_policy = tip_policy or labware.tip_policy
    if len(set(dyes)) != len(dyes):
        reasons.append(f"duplicate dye names: {list(dyes)}")
    if WATER in dyes:
        reasons.append(f"{WATER!r} is reserved for the diluent")
    reasons += [f"dye {d!r} is not on the deck (stocks: {', '.join(deck.names)})"
                for d in dyes if d != WATER and d not in deck.names]
    physical = Limits(total_ul=labware.plate.working_volume_ul,
                      working_volume_ul=labware.plate.working_volume_ul,
                      min_transfer_ul=labware.pipette.min_ul,
                      max_transfer_ul=labware.pipette.max_ul)
    wells: dict[str, dict[str, float]] = {}
    for r in recipes:
        reasons += well_violations(r.well, labware.plate)
        if r.well in wells:
            reasons.append(f"well {r.well} appears twice in the batch")
        unknown = set(r.dyes) - set(dyes)
        if unknown:
            reasons.append(f"well {r.well}: dyes {sorted(unknown)} not in {list(dyes)}")
        liquids = {**{d: float(v) for d, v in r.dyes.items()}, WATER: float(r.water)}
        for liquid, volume in liquids.items():
            reasons += [f"well {r.well}: {reason}" for reason in transfer_violations(
                liquid, volume, physical, whole_ul=False, split=True)]
        total = sum(liquids.values())
        if total > labware.plate.working_volume_ul:
            reasons.append(f"well {r.well}: {total:g} µL exceeds the working volume "
                           f"{labware.plate.working_volume_ul:g} µL")
        wells[r.well] = liquids
    if reasons:
        return reasons
    stocks = {s.name: s.volume_ul for s in deck.stocks}
    reasons += stock_violations(demand(wells), stocks, labware.reservoir.dead_volume_ul)
    reasons += tip_violations(tips_for(wells, tip_policy),
                              labware.tiprack.tips * len(deck.tiprack_slots))
    return reasons


# -- the deck: configuration -----------------------------------------------------------------------
_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")


@dataclass(frozen=True)
class Stock:
    """One liquid in the reservoir: its name, reservoir well, volume at the start of a run and
    display colour (the Opentrons App shows it; labbus never uses it for colour maths)."""

    name: str
    well: str
    volume_ul: float
    color: str = "#9E9E9E"


DEFAULT_STOCKS: tuple[Stock, ...] = (
    Stock("red", "A1", 15000.0, "#E53935"),
    Stock("yellow", "A2", 15000.0, "#FDD835"),
    Stock("blue", "A3", 15000.0, "#1E88E5"),
    Stock(WATER, "A4", 15000.0, "#B3E5FC"),
)


@dataclass(frozen=True)
class DeckLayout:
    """What sits where on the OT-2 deck: the stocks in the reservoir and the slots (1-11)."""

    stocks: tuple[Stock, ...] = DEFAULT_STOCKS
    tiprack_slots: tuple[int, ...] = (1,)
    reservoir_slot: int = 2
    plate_slot: int = 3
    pipette_mount: Literal["left", "right"] = "right"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stocks)

    @property
    def dyes(self) -> tuple[str, ...]:
        """The dye stocks on the deck (every stock but water), in layout order."""
        return tuple(s.name for s in self.stocks if s.name != WATER)

    def stock(self, name: str) -> Stock:
        for s in self.stocks:
            if s.name == name:
                return s
        raise KeyError(f"no stock {name!r} on the deck (stocks: {', '.join(self.names)})")

    def source_wells(self, dyes: Sequence[str]) -> dict[str, str]:
        """Reservoir well of each liquid a batch uses: its dyes in the given order, then water."""
        return {name: self.stock(name).well for name in [*dyes, WATER]}

    def __str__(self) -> str:
        stocks = ", ".join(f"{s.name} {s.well} {s.volume_ul:g} µL" for s in self.stocks)
        return (f"{stocks}; tips in {','.join(map(str, self.tiprack_slots))}, reservoir in "
                f"{self.reservoir_slot}, plate in {self.plate_slot}, pipette {self.pipette_mount}")


DEFAULT_DECK = DeckLayout()


def deck_violations(deck: DeckLayout, labware: Labware = LABWARE) -> list[str]:
    reasons = []
    slots = [*deck.tiprack_slots, deck.reservoir_slot, deck.plate_slot]
    if not deck.tiprack_slots:
        reasons.append("no tiprack slot")
    if len(set(slots)) != len(slots) or not all(s in DECK_SLOTS for s in slots):
        reasons.append(f"deck slots must be distinct and within 1-11: {slots}")
    if deck.pipette_mount not in ("left", "right"):
        reasons.append(f"pipette mount {deck.pipette_mount!r} is neither 'left' nor 'right'")
    names = [s.name for s in deck.stocks]
    if WATER not in names:
        reasons.append(f"no {WATER} stock (it tops every well up)")
    if len(set(names)) != len(names):
        reasons.append(f"stock names repeat: {', '.join(names)}")
    wells = [s.well for s in deck.stocks]
    if len(set(wells)) != len(wells):
        reasons.append(f"reservoir wells repeat: {', '.join(wells)}")
    reservoir = labware.reservoir
    for s in deck.stocks:
        if not s.name or not s.name.strip():
            reasons.append("a stock has no name")
        if s.well not in reservoir.wells:
            reasons.append(f"{s.name}: reservoir well {s.well!r} is not one of "
                           f"{reservoir.wells[0]}-{reservoir.wells[-1]}")
        if not (math.isfinite(s.volume_ul)
                and reservoir.dead_volume_ul < s.volume_ul <= reservoir.capacity_ul):
            reasons.append(f"{s.name}: {s.volume_ul:g} µL must be above the dead volume "
                           f"{reservoir.dead_volume_ul:g} µL and at most "
                           f"{reservoir.capacity_ul:g} µL")
        if not _HEX.match(s.color):
            reasons.append(f"{s.name}: colour {s.color!r} is not #RRGGBB")
    return reasons


def deck_from_json(data: object, labware: Labware = LABWARE) -> DeckLayout:
    """A DeckLayout from its JSON form; ValueError naming everything wrong. Form::

        {"stocks": [{"name": "red", "well": "A1", "volume_ul": 12000, "color": "#E53935"}, ...],
         "tiprack_slots": [1], "reservoir_slot": 2, "plate_slot": 3, "pipette_mount": "right"}

    "stocks" is required (water among them); the rest default to DEFAULT_DECK's; "color" to grey.
    """
    if not isinstance(data, dict):
        raise ValueError("a deck layout is a JSON object")
    extra = set(data) - {"stocks", "tiprack_slots", "reservoir_slot", "plate_slot",
                         "pipette_mount"}
    if extra:
        raise ValueError(f"unknown key(s) {', '.join(sorted(extra))}")
    raw = data.get("stocks")
    if not isinstance(raw, list) or not raw:
        raise ValueError('"stocks" must be a non-empty list')
    stocks = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"name", "well", "volume_ul"} <= set(item) \
                or set(item) - {"name", "well", "volume_ul", "color"}:
            raise ValueError(f"stock {i}: expected name, well, volume_ul and optional color")
        name, well, volume = item["name"], item["well"], item["volume_ul"]
        color = item.get("color", Stock.color)
        if not (isinstance(name, str) and isinstance(well, str) and isinstance(color, str)):
            raise ValueError(f"stock {i}: name, well and color are strings")
        if isinstance(volume, bool) or not isinstance(volume, (int, float)):
            raise ValueError(f"stock {i} ({name}): volume_ul must be a number")
        stocks.append(Stock(name, well, float(volume), color))
    slots = data.get("tiprack_slots", list(DEFAULT_DECK.tiprack_slots))
    if not isinstance(slots, list) or not all(_is_int(s) for s in slots):
        raise ValueError('"tiprack_slots" must be a list of slot numbers')
    single = {k: data.get(k, getattr(DEFAULT_DECK, k)) for k in ("reservoir_slot", "plate_slot")}
    for key, value in single.items():
        if not _is_int(value):
            raise ValueError(f'"{key}" must be a slot number')
    deck = DeckLayout(tuple(stocks), tuple(slots), single["reservoir_slot"], single["plate_slot"],
                      data.get("pipette_mount", DEFAULT_DECK.pipette_mount))
    reasons = deck_violations(deck, labware)
    if reasons:
        raise ValueError("; ".join(reasons))
    return deck


def deck_to_json(deck: DeckLayout) -> dict:
    return {"stocks": [{"name": s.name, "well": s.well, "volume_ul": s.volume_ul,
                        "color": s.color} for s in deck.stocks],
            "tiprack_slots": list(deck.tiprack_slots), "reservoir_slot": deck.reservoir_slot,
            "plate_slot": deck.plate_slot, "pipette_mount": deck.pipette_mount}


def load_deck(path: str | Path, labware: Labware = LABWARE) -> DeckLayout:
    """Read a deck layout file; ValueError saying why when it is unreadable or wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"it is not JSON: {exc}") from None
    return deck_from_json(data, labware)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

