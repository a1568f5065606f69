"""Closed-loop colour-mixing campaigns as plain functions: events in, events out, no I/O.

One `Campaign` per experiment holds everything decided so far. Its state depends only on the
input events (ExperimentRequested, WellColourMeasured, RobotRunFinished, RobotRunFailed), never on
the order in which events of different topics arrive: a reading for a batch not proposed yet is
parked until its batch exists; a batch is complete when every well is scored *and* its robot run
finished (so a run that fails after dispensing every well fails the experiment whichever event
comes first); a complete batch is fed to the optimiser in plate-well order. Every output
carries an id derived from the experiment and its position in the campaign, so replaying the
inputs from the beginning re-derives byte-for-byte the same decisions with the same event ids.

Learning across campaigns: a campaign's model is warm-started with the scored wells (recipe ->
measured RGB) of every *other* experiment on the same set of dye stocks whose reading is older than
the request (by log time, `at`). That set is fixed when the campaign starts, so it depends only on
the log, not on the order the topics are read in, provided every input older than the request has
been handled before the request is (the processor holds requests back until it has; see
processors/experiment.py). Warm-start wells shape the model but never count as evidence of a match.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from labbus.events import labware
from labbus.events.codec import default_codec
from labbus.events.labware import DEFAULT_DECK, MAX_WELLS, DeckLayout, WellRecipe
from labbus.events.model import (
    Event,
    ExperimentCancelled,
    ExperimentCancelRequested,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    RecipeRejected,
    RecipesProposed,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    WellColourMeasured,
    WellScored,
    derived_id,
)
from labbus.events.ot2_protocol import generate_protocol, protocol_hash
from labbus.processors.colour import optimiser, recipes, scoring

SOURCE = "experiment"
PLATE_WELLS = labware.well_names()  # the order wells are allocated in


@dataclass
class Campaign:
    experiment_id: str
    request_id: uuid.UUID
    target_lab: np.ndarray
    dyes: list[str]
    budget: int
    batch_size: int
    tolerance: float
    iteration: int = -1
    batch: dict[str, dict[str, int]] = field(default_factory=dict)  # well -> recipe of this batch
    run_id: str | None = None
    runs_finished: set[str] = field(default_factory=set)
    scored: dict[str, tuple[list[int], float]] = field(default_factory=dict)  # well -> (rgb, ΔE)
    recipes_by_well: dict[str, dict[str, int]] = field(default_factory=dict)
    history: list[optimiser.Observation] = field(default_factory=list)
    warm_start: list[optimiser.Observation] = field(default_factory=list)  # other campaigns' wells
    parked: dict[tuple[int, str], WellColourMeasured] = field(default_factory=dict)
    read_at: dict[tuple[int, str], int] = field(default_factory=dict)  # log time of each reading
    wells_allocated: int = 0
    outputs: int = 0
    finished: bool = False
    deck: DeckLayout = DEFAULT_DECK  # the stocks and slots the campaign's protocols use

    @property
    def wells_used(self) -> int:
        return len(self.history)

    def emit(self, cls: type[Event], purpose: str, cause: uuid.UUID, **payload) -> Event:
        self.outputs += 1
        return cls.create(
            source=SOURCE, subject=self.experiment_id, sequence=self.outputs,
            event_id=uuid.UUID(derived_id(self.request_id, purpose)),
            correlation_id=self.request_id, causation_id=cause,
            experiment_id=self.experiment_id, **payload)


# -- state as JSON-able values (a faust Table's changelog) -----------------------------------------
# Lists of pairs rather than objects wherever order matters (plate order, dye order), so the state
# reads back the same whatever a serialiser does with object keys.

def _pairs(mapping: dict) -> list[list]:
    return [[k, v] for k, v in mapping.items()]


def _observation_state(o: optimiser.Observation) -> list:
    return [_pairs(dict(o.recipe)), [int(v) for v in o.rgb8]]


def _observation(value: list) -> optimiser.Observation:
    recipe, rgb = value
    return optimiser.Observation({d: v for d, v in recipe}, tuple(int(v) for v in rgb))


def to_state(c: Campaign) -> dict:
    """The campaign as JSON-able values (str, int, float, bool, None, lists, str-keyed dicts);
    `from_state(to_state(c))` decides exactly as `c` does."""
    codec = default_codec()
    return {
        "experiment_id": c.experiment_id,
        "request_id": str(c.request_id),
        "target_lab": [float(v) for v in c.target_lab],
        "dyes": list(c.dyes),
        "budget": c.budget,
        "batch_size": c.batch_size,
        "tolerance": float(c.tolerance),
        "iteration": c.iteration,
        "batch": [[w, _pairs(r)] for w, r in c.batch.items()],
        "run_id": c.run_id,
        "runs_finished": sorted(c.runs_finished),
        "scored": [[w, [int(v) for v in rgb], float(de)] for w, (rgb, de) in c.scored.items()],
        "recipes_by_well": [[w, _pairs(r)] for w, r in c.recipes_by_well.items()],
        "history": [_observation_state(o) for o in c.history],
        "warm_start": [_observation_state(o) for o in c.warm_start],
        "parked": [[it, well, base64.b64encode(codec.encode(reading)).decode("ascii")]
                   for (it, well), reading in c.parked.items()],
        "read_at": [[it, well, at] for (it, well), at in c.read_at.items()],
        "wells_allocated": c.wells_allocated,
        "outputs": c.outputs,
        "finished": c.finished,
    }


def from_state(state: dict, deck: DeckLayout = DEFAULT_DECK) -> Campaign:
    """The campaign `to_state` wrote (the state is not modified); `deck` is configuration, not
    state: the layout its next robot runs use."""
    codec = default_codec()
    return Campaign(
        experiment_id=state["experiment_id"],
        request_id=uuid.UUID(state["request_id"]),
        target_lab=np.asarray(state["target_lab"], dtype=float),
        dyes=list(state["dyes"]),
        budget=state["budget"],
        batch_size=state["batch_size"],
        tolerance=state["tolerance"],
        iteration=state["iteration"],
        batch={w: {d: v for d, v in r} for w, r in state["batch"]},
        run_id=state["run_id"],
        runs_finished=set(state["runs_finished"]),
        scored={w: (list(rgb), de) for w, rgb, de in state["scored"]},
        recipes_by_well={w: {d: v for d, v in r} for w, r in state["recipes_by_well"]},
        history=[_observation(o) for o in state["history"]],
        warm_start=[_observation(o) for o in state["warm_start"]],
        parked={(it, well): codec.decode(base64.b64decode(data))
                for it, well, data in state["parked"]},
        read_at={(it, well): at for it, well, at in state["read_at"]},
        wells_allocated=state["wells_allocated"],
        outputs=state["outputs"],
        finished=state["finished"],
        deck=deck,
    )


def settled(c: Campaign) -> bool:
    """Decided, and nothing more can change: its last batch never went to the robot (recipe
    rules broken), or every well of it is scored (readings of the current batch are still
    scored after a failed run's verdict)."""
    sent = c.run_id == derived_id(c.request_id, f"run/{c.iteration}")
    return c.finished and (not sent or all(w in c.scored for w in c.batch))


def request_problems(req: ExperimentRequested, deck: DeckLayout = DEFAULT_DECK) -> list[str]:
    """Everything wrong with a request, as readable sentences; empty when it can run. The dyes
    must be stocks on the deck."""
    problems = []
    if not req.experiment_id.strip():
        problems.append("experiment_id is empty")
    if not req.dyes:
        problems.append("no dyes given")
    unknown = [d for d in req.dyes if d not in deck.dyes]
    if unknown:
        problems.append(f"unknown dye(s) {', '.join(unknown)}; the deck holds "
                        f"{', '.join(deck.dyes)}")
    if len(set(req.dyes)) != len(req.dyes):
        problems.append(f"dyes repeat: {', '.join(req.dyes)}")
    if not 1 <= req.budget_wells <= MAX_WELLS:
        problems.append(f"budget of {req.budget_wells} wells is outside 1..{MAX_WELLS} "
                        "(one 96-well plate)")
    if not 1 <= req.batch_size <= MAX_WELLS:
        problems.append(f"batch size {req.batch_size} is outside 1..{MAX_WELLS}")
    if not (math.isfinite(req.tolerance_de) and req.tolerance_de > 0):
        problems.append(f"tolerance ΔE00 {req.tolerance_de} must be a positive number")
    if req.target_hex is not None:
        try:
            scoring.parse_target(req.target_hex)
        except scoring.TargetError as exc:
            problems.append(str(exc))
    if len(req.target_lab) != 3 or not all(math.isfinite(v) for v in req.target_lab):
        problems.append(f"target_lab must be three finite numbers, got {list(req.target_lab)}")
    elif not 0.0 <= req.target_lab[0] <= 100.0:
        problems.append(f"target L* {req.target_lab[0]} is outside 0..100")
    return problems


def rejection(req: ExperimentRequested, deck: DeckLayout = DEFAULT_DECK
              ) -> ExperimentRejected | None:
    """The ExperimentRejected of a request that cannot run (`request_problems`), else None."""
    problems = request_problems(req, deck)
    if not problems:
        return None
    return ExperimentRejected.create(
        source=SOURCE, subject=req.experiment_id, sequence=1,
        event_id=uuid.UUID(derived_id(req.event_id, "rejected")),
        correlation_id=req.event_id, causation_id=req.event_id,
        experiment_id=req.experiment_id, reason="; ".join(problems))


def start(req: ExperimentRequested, warm_start: Sequence[optimiser.Observation] = (),
          deck: DeckLayout = DEFAULT_DECK) -> tuple[Campaign | None, list[Event]]:
    """A new campaign and its first batch, or None and an ExperimentRejected. `warm_start`: wells
    of earlier campaigns with the same dye stocks (see `warm_start_for`); `deck`: the layout its
    robot runs use."""
    rejected = rejection(req, deck)
    if rejected is not None:
        return None, [rejected]
    c = Campaign(req.experiment_id, req.event_id, np.asarray(req.target_lab, dtype=float),
                 list(req.dyes), req.budget_wells, req.batch_size, req.tolerance_de,
                 warm_start=list(warm_start), deck=deck)
    return c, _next(c, req.event_id)


@dataclass(frozen=True)
class Scored:
    """One scored well of some campaign, as a warm start for later ones."""
    at: int  # log time of its reading, ms
    experiment_id: str
    well: str
    dyes: frozenset[str]
    observation: optimiser.Observation


def warm_start_for(req: ExperimentRequested, at: int, scored: Sequence[Scored]
                   ) -> list[optimiser.Observation]:
    """The wells of other experiments on the same set of dyes read before `at` (the request's log
    time), oldest first: a pure function of the log."""
    dyes = frozenset(req.dyes)
    mine = [s for s in scored if s.dyes == dyes and s.at < at
            and s.experiment_id != req.experiment_id]
    return [s.observation for s in sorted(mine, key=lambda s: (s.at, s.experiment_id, s.well))]


def _propose(c: Campaign) -> optimiser.Proposal:
    return optimiser.propose(c.history, c.target_lab, c.dyes, batch_size=c.batch_size,
                             budget=c.budget, tolerance=c.tolerance, warm_start=c.warm_start)


def _next(c: Campaign, cause: uuid.UUID) -> list[Event]:
    """Ask the optimiser; emit the next batch (proposal + robot run) or the verdict."""
    proposal = _propose(c)
    if proposal.done:
        return _complete(c, proposal, cause)
    if not proposal.recipes:
        return _fail(c, proposal.reason, cause, proposal.best_measured_de)
    c.iteration += 1
    free = PLATE_WELLS[c.wells_allocated:]
    n = min(len(proposal.recipes), len(free), c.budget - c.wells_allocated)
    if n <= 0:
        return _fail(c, f"no free wells left on the plate after {c.wells_allocated}", cause,
                     proposal.best_measured_de)
    batch = {well: {d: int(recipe.get(d, 0)) for d in c.dyes}
             for well, recipe in zip(free[:n], proposal.recipes[:n], strict=True)}
    c.wells_allocated += n
    c.batch = batch
    c.recipes_by_well.update(batch)
    records = [{"well": w, "volumes": {d: float(v) for d, v in r.items()},
                "water_ul": float(recipes.water_ul(r))} for w, r in batch.items()]
    it = c.iteration
    out: list[Event] = [c.emit(RecipesProposed, f"proposed/{it}", cause, iteration=it,
                               recipes=records, predicted_de=proposal.predicted_de,
                               note=proposal.reason)]
    deck, rules = c.deck, labware.LABWARE
    reasons = labware.plan_violations(
        batch, {s.name: s.volume_ul for s in deck.stocks},
        dead_volume_ul=rules.reservoir.dead_volume_ul,
        tips_available=rules.tiprack.tips * len(deck.tiprack_slots), dyes=c.dyes)
    text = None
    if not reasons:
        try:
            text = generate_protocol([WellRecipe(r["well"], r["volumes"], r["water_ul"])
                                      for r in records], c.dyes, deck)
        except ValueError as exc:
            reasons.append(f"protocol: {exc}")
    if reasons:
        out.append(c.emit(RecipeRejected, f"recipe-rejected/{it}", cause, iteration=it,
                          reasons=reasons))
        out += _fail(c, f"batch {it} broke the robot's recipe rules: {reasons[0]}", cause,
                     proposal.best_measured_de)
        return out
    c.run_id = derived_id(c.request_id, f"run/{it}")
    out.append(c.emit(RobotRunRequested, f"run-requested/{it}", cause, run_id=c.run_id,
                      iteration=it, protocol_hash=protocol_hash(text), protocol_text=text,
                      recipes=records))
    return out


def on_reading(c: Campaign, reading: WellColourMeasured, at: int = 0) -> list[Event]:
    """Score a reading; when it completes the batch, decide what comes next. Readings of the
    current batch are scored even after a verdict, so the scores do not depend on whether a
    failed run's outcome or its readings were read first."""
    slot = (reading.iteration, reading.well)
    c.read_at.setdefault(slot, at)
    if reading.iteration > c.iteration:  # its batch is not proposed yet (replay order)
        c.parked.setdefault(slot, reading)
        return []
    if reading.iteration < c.iteration or reading.well not in c.batch or reading.well in c.scored:
        return []  # stale, unknown well, or a repeat
    return _score(c, reading)


def _score(c: Campaign, reading: WellColourMeasured) -> list[Event]:
    de = float(scoring.delta_e2000(np.asarray(reading.lab, dtype=float), c.target_lab))
    rgb = [int(v) for v in reading.rgb]
    c.scored[reading.well] = (rgb, de)
    recipe = c.batch[reading.well]
    out: list[Event] = [c.emit(WellScored, f"scored/{reading.well}", reading.event_id,
                               iteration=c.iteration, well=reading.well, delta_e=de,
                               volumes={d: float(v) for d, v in recipe.items()}, rgb=rgb)]
    return out + _advance(c, reading.event_id)


def on_run_finished(c: Campaign, finished: RobotRunFinished) -> list[Event]:
    c.runs_finished.add(finished.run_id)
    if c.finished or finished.run_id != c.run_id:
        return []
    return _advance(c, finished.event_id)


def _advance(c: Campaign, cause: uuid.UUID) -> list[Event]:
    """The next step once the batch is complete: every well scored and its run finished."""
    if (c.finished or c.run_id not in c.runs_finished
            or any(w not in c.scored for w in c.batch)):
        return []
    out: list[Event] = []
    for well in c.batch:  # plate order, whatever order the readings came in
        c.history.append(optimiser.Observation(c.batch[well], tuple(c.scored[well][0])))
    out += _next(c, cause)
    for slot in sorted(k for k in c.parked if k[0] == c.iteration):
        out += on_reading(c, c.parked.pop(slot))
    return out


def on_run_failed(c: Campaign, failed: RobotRunFailed) -> list[Event]:
    if c.finished or failed.run_id != c.run_id:
        return []
    done = [de for well, (_, de) in c.scored.items() if well not in c.batch]  # earlier batches
    return _fail(c, f"robot run {failed.run_id} (batch {failed.iteration}) failed: {failed.error}",
                 failed.event_id, min(done, default=None))


def cancel(c: Campaign, req: ExperimentCancelRequested) -> list[Event]:
    """Stop the campaign: no new batch is proposed; a robot run in flight may finish and its
    wells are still scored (`on_reading`), as after a failure. ExperimentCancelled counts the
    wells sent to the robot, that run included. Nothing for a campaign already decided."""
    if c.finished:
        return []
    c.finished = True
    best = min((de for _, de in c.scored.values()), default=None)
    return [c.emit(ExperimentCancelled, "cancelled", req.event_id, reason=req.reason,
                   cancelled_by=req.requested_by, wells_used=c.wells_allocated,
                   best_de=None if best is None else float(best))]


def cancel_before_start(req: ExperimentRequested, cancel_req: ExperimentCancelRequested
                        ) -> ExperimentCancelled:
    """The ExperimentCancelled of a request cancelled before its campaign started (its budget
    not reserved yet): no well used. Same id as `cancel` would give it."""
    return ExperimentCancelled.create(
        source=SOURCE, subject=req.experiment_id, sequence=1,
        event_id=uuid.UUID(derived_id(req.event_id, "cancelled")), correlation_id=req.event_id,
        causation_id=cancel_req.event_id, experiment_id=req.experiment_id,
        reason=cancel_req.reason, cancelled_by=cancel_req.requested_by, wells_used=0,
        best_de=None)


def _best(c: Campaign, volumes: dict[str, int] | None = None) -> tuple[str, float]:
    """The scored well with the lowest ΔE00 (among wells holding `volumes`, when given)."""
    wells = [w for w in c.scored if volumes is None or c.recipes_by_well[w] == volumes]
    well = min(wells or c.scored, key=lambda w: (c.scored[w][1], w))
    return well, c.scored[well][1]


def _complete(c: Campaign, proposal: optimiser.Proposal, cause: uuid.UUID) -> list[Event]:
    c.finished = True
    best_recipe = {d: int(proposal.best_recipe.get(d, 0)) for d in c.dyes}
    well, _ = _best(c, best_recipe)
    return [c.emit(ExperimentCompleted, "completed", cause, best_well=well,
                   best_volumes={d: float(v) for d, v in best_recipe.items()},
                   best_de=float(proposal.best_measured_de), wells_used=c.wells_used,
                   reason=proposal.reason)]


def _fail(c: Campaign, reason: str, cause: uuid.UUID, best_de: float | None) -> list[Event]:
    c.finished = True
    return [c.emit(ExperimentFailed, "failed", cause, reason=reason, wells_used=c.wells_used,
                   best_de=None if best_de is None else float(best_de))]


class Campaigns:
    """Every campaign, fed events of any of the input types in any cross-topic order."""

    def __init__(self, learn: bool = True, deck: DeckLayout = DEFAULT_DECK) -> None:
        self.deck = deck  # the OT-2 deck layout (LABBUS_DECK_LAYOUT): dye stocks and slots
        self.by_id: dict[str, Campaign] = {}
        self.rejected: set[str] = set()
        self.waiting: dict[str, list[tuple[Event, int]]] = {}  # inputs before their request
        self.learn = learn  # warm-start new campaigns with earlier campaigns' wells
        self.scored: list[Scored] = []  # every scored well of every campaign

    def handle(self, event: Event, at: int | None = None) -> list[Event]:
        """`at`: the event's log time in ms (the Kafka record timestamp); defaults to when it
        was recorded. It decides which earlier wells a new campaign learns from."""
        if at is None:
            at = int(event.envelope.recorded_at.timestamp() * 1000)
        if isinstance(event, ExperimentRequested):
            xid = event.experiment_id
            if xid in self.by_id or xid in self.rejected:
                return []  # a repeated request: the first one counts
            warm = warm_start_for(event, at, self.scored) if self.learn else []
            campaign, out = start(event, warm, self.deck)
            if campaign is None:
                self.rejected.add(xid)
                return out
            self.by_id[xid] = campaign
            for waiting, when in self.waiting.pop(xid, []):
                out += self.handle(waiting, when)
            return out
        if isinstance(event, (WellColourMeasured, RobotRunFinished, RobotRunFailed)):
            campaign = self.by_id.get(event.experiment_id)
            if campaign is None:
                if event.experiment_id not in self.rejected:
                    self.waiting.setdefault(event.experiment_id, []).append((event, at))
                return []
            if isinstance(event, WellColourMeasured):
                return self._remember(campaign, on_reading(campaign, event, at))
            if isinstance(event, RobotRunFinished):
                return self._remember(campaign, on_run_finished(campaign, event))
            return on_run_failed(campaign, event)
        return []

    def _remember(self, c: Campaign, out: list[Event]) -> list[Event]:
        dyes = frozenset(c.dyes)
        for e in out:
            if isinstance(e, WellScored):
                self.scored.append(Scored(c.read_at.get((e.iteration, e.well), 0), c.experiment_id,
                                          e.well, dyes, optimiser.Observation(
                                              {d: int(v) for d, v in e.volumes.items()},
                                              tuple(int(v) for v in e.rgb))))
        return out


def simulate(req: ExperimentRequested, read: callable, max_steps: int = 200,
             campaigns: Campaigns | None = None) -> list[Event]:
    """Drive a campaign with a reader function `read(volumes) -> rgb8, lab` (tests, demos).
    Pass the `campaigns` of earlier simulations to let this one learn from their wells."""
    campaigns = Campaigns() if campaigns is None else campaigns
    pending: list[Event] = campaigns.handle(req)
    log: list[Event] = list(pending)
    for _ in range(max_steps):
        runs = [e for e in pending if isinstance(e, RobotRunRequested)]
        if not runs:
            break
        pending = []
        for run in runs:
            pending += campaigns.handle(RobotRunFinished.create(
                source="sim", subject=run.experiment_id, sequence=0, run_id=run.run_id,
                experiment_id=run.experiment_id, iteration=run.iteration,
                commands=0, wells=len(run.recipes)))
            for r in run.recipes:
                rgb, lab = read({**r["volumes"], "water": r["water_ul"]})
                reading = WellColourMeasured.create(
                    source="sim", subject=run.experiment_id, sequence=0,
                    experiment_id=run.experiment_id, run_id=run.run_id,
                    iteration=run.iteration, well=r["well"], rgb=list(rgb), lab=list(lab),
                    instrument_id="sim")
                pending += campaigns.handle(reading)
        log += pending
    return log


def target_from(text: str | Sequence[float]) -> list[float]:
    return [float(v) for v in scoring.parse_target(text)]
