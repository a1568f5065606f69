"""The experiment processor: closed-loop colour-mixing campaigns (processors/campaign.py) on faust.

Inputs: ExperimentRequested, QuotaReserved, ExperimentRejected and ExperimentCancelRequested
(lab.experiments), RobotRunFinished / RobotRunFailed (lab.robot.runs) and WellColourMeasured
(lab.colour.readings), all keyed by experiment_id with the same partition count, so partition p
of the three is one worker's: `labbus.events.faust_runtime` runs `handle` below over them.

A campaign starts only once its budget is reserved: a request that can run is kept (with its log
time) until the quota processor's QuotaReserved for it, which starts the campaign exactly as the
request did before quotas (the warm start is still chosen by the *request's* log time, so a
replay decides the same); the quota processor's ExperimentRejected (quota_exceeded) drops it.
A request that cannot run is rejected at once (the quota processor then gives its reservation,
if any, back). ExperimentCancelRequested stops a campaign (`campaign.cancel`: no new batch, a
run in flight may finish) or a request still waiting for its reservation
(ExperimentCancelled with no well used; the reservation that may still come is dropped).
The processor keeps

- Table `campaigns`, keyed by experiment_id: the campaign (`campaign.to_state`) while it runs;
  before it, `{"request": [encoded request, log time]}` while the reservation is awaited, or
  `{"cancelled": true}` for a request cancelled meanwhile, until the quota decision comes;
  once it is settled (verdict given, nothing outstanding) the key is deleted, so the compacted
  changelog keeps nothing of finished campaigns. Inputs of an experiment without a campaign wait
  in its value until the request comes (after a takeover the replayed request can follow
  readings produced since); inputs re-delivered after a campaign settled wait there too, for
  ever (at most MAX_WAITING; they only arise from a crash just after a campaign ended);
- GlobalTable `scored-wells`: the most recent scored wells per dye set, RING per input partition
  (key `dyes|partition|slot`, one record per scored well; only the worker owning the partition
  writes them, so each key has one writer). Every worker reads all of it: a new campaign is
  warm-started with up to WARM_MAX of the latest wells of *other* campaigns on the same set of
  dyes read (Kafka record time) before its request — whichever worker scored them. The chosen
  wells are stored in the campaign's state, so a restart never changes them.

Output ids derive from the request id and their purpose (campaign.py), so an input handled again
after a crash re-emits identical events (see faust_runtime: at-least-once). Nothing here is
time-driven, so there are no timers.
"""

from __future__ import annotations

import base64
import functools
import logging

from labbus.events import faust_runtime
from labbus.events.codec import default_codec
from labbus.events.config import Config
from labbus.events.labware import DEFAULT_DECK, DeckLayout
from labbus.events.model import (
    Event,
    ExperimentCancelRequested,
    ExperimentRejected,
    ExperimentRequested,
    QuotaReserved,
    RobotRunFailed,
    RobotRunFinished,
    WellColourMeasured,
    WellScored,
)
from labbus.events.runtime import Record
from labbus.events.topics import COLOUR_READINGS, EXPERIMENTS, ROBOT_RUNS
from labbus.processors import campaign
from labbus.processors.colour import optimiser

PROCESS = "experiment"
INPUTS = (EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS)
ACCEPTS = {ExperimentRequested.TYPE, QuotaReserved.TYPE, ExperimentRejected.TYPE,
           ExperimentCancelRequested.TYPE, WellColourMeasured.TYPE, RobotRunFinished.TYPE,
           RobotRunFailed.TYPE}
PARTITIONS = EXPERIMENTS.partitions
RING = 96  # scored wells kept per dye set and input partition (GlobalTable)
WARM_MAX = 96  # wells of earlier campaigns a new campaign learns from, at most (the latest)
MAX_WAITING = 500  # inputs kept for an experiment whose request has not been handled (yet)
log = logging.getLogger(__name__)

assert all(spec.partitions == PARTITIONS for spec in INPUTS), "inputs must be co-partitioned"


def dye_set(dyes) -> str:
    return ",".join(sorted(dyes))


def _ring(shared, key: str, partition: int) -> list[list]:
    """The wells held for one dye set and partition: [seq, read_at, experiment, well, recipe,
    rgb] each, in slot order."""
    return [w for w in (shared.get(f"{key}|{partition}|{i}") for i in range(RING)) if w]


def warm_start(shared, req: ExperimentRequested, at: int) -> list[optimiser.Observation]:
    """The latest WARM_MAX wells of other experiments on the same dyes read before `at` (the
    request's log time), oldest first."""
    key = dye_set(req.dyes)
    wells = {}
    for p in range(PARTITIONS):
        for _, read_at, xid, name, recipe, rgb in _ring(shared, key, p):
            if read_at < at and xid != req.experiment_id:
                wells[(read_at, xid, name)] = optimiser.Observation(
                    {d: v for d, v in recipe}, tuple(rgb))
    return [wells[k] for k in sorted(wells)][-WARM_MAX:]


def remember(shared, c: campaign.Campaign, out: list[Event], partition: int) -> None:
    """Put the wells scored in `out` into the ring of their dye set and partition: one table
    record per well, in the slot after the newest (by sequence number)."""
    key = dye_set(c.dyes)
    for e in out:
        if isinstance(e, WellScored):
            seq = max((w[0] for w in _ring(shared, key, partition)), default=-1) + 1
            shared[f"{key}|{partition}|{seq % RING}"] = [
                seq, c.read_at.get((e.iteration, e.well), 0), c.experiment_id, e.well,
                [[d, int(v)] for d, v in e.volumes.items()], [int(v) for v in e.rgb]]


def _saved(c: campaign.Campaign) -> dict | None:
    """The table value: None (the key is deleted) once the campaign is settled, so the
    compacted changelog keeps nothing of finished campaigns."""
    if campaign.settled(c):
        return None
    return {"campaign": campaign.to_state(c)}


def _apply(c: campaign.Campaign, event: Event, at: int) -> list[Event]:
    if isinstance(event, WellColourMeasured):
        return campaign.on_reading(c, event, at)
    if isinstance(event, RobotRunFinished):
        return campaign.on_run_finished(c, event)
    if isinstance(event, RobotRunFailed):
        return campaign.on_run_failed(c, event)
    return []


def handle(state: dict | None, event: Event, record: Record, shared,
           deck: DeckLayout = DEFAULT_DECK) -> tuple[dict | None, list[Event]]:
    """One input of one experiment: its table value before and after, and the events decided.
    `record.timestamp` (log time) decides which earlier wells a new campaign learns from.

    Inputs of an experiment with no campaign wait in its table value for the request: after a
    takeover the replayed request can come after readings produced since (the three topics are
    read independently)."""
    if isinstance(event, ExperimentRequested):
        if state is not None and ({"campaign", "request", "cancelled"} & state.keys()):
            return state, []  # a repeated request: the first one counts
        rejected = campaign.rejection(event, deck)
        if rejected is not None:
            return None, [rejected]  # nothing to keep
        return {**(state or {}), "request": [_encoded(event), record.timestamp]}, []
    if isinstance(event, (QuotaReserved, ExperimentRejected, ExperimentCancelRequested)):
        return _on_command(state, event, record, shared, deck)
    if state is None or "campaign" not in state:
        waiting = list((state or {}).get("waiting", []))
        if len(waiting) >= MAX_WAITING:
            log.warning("too many inputs waiting for their request; dropped",
                        extra={"experiment_id": getattr(event, "experiment_id", None),
                               "event_type": event.TYPE})
            return state, []
        return {**(state or {}), "waiting": [*waiting, [_encoded(event), record.timestamp]]}, []
    c = campaign.from_state(state["campaign"], deck)
    out = _apply(c, event, record.timestamp)
    remember(shared, c, out, record.partition)
    saved = _saved(c)
    return (state if saved == state else saved), out  # unchanged: nothing to write


def _encoded(event: Event) -> str:
    return base64.b64encode(default_codec().encode(event)).decode("ascii")


def _on_command(state: dict | None, event: Event, record: Record, shared, deck: DeckLayout
                ) -> tuple[dict | None, list[Event]]:
    """The quota decision on a waiting request, or a cancel request."""
    state = state or {}
    if "campaign" in state:
        if not isinstance(event, ExperimentCancelRequested):
            return state, []  # the campaign runs already
        c = campaign.from_state(state["campaign"], deck)
        out = campaign.cancel(c, event)
        saved = _saved(c)
        return (state if saved == state else saved), out
    if "request" not in state:
        if "cancelled" in state and not isinstance(event, ExperimentCancelRequested):
            return None, []  # the quota decision on a cancelled request: nothing more to wait for
        return state or None, []  # no request waiting (rejected, unknown, or a repeat)
    data, at = state["request"]
    req = default_codec().decode(base64.b64decode(data))
    if isinstance(event, ExperimentRejected):
        return None, []  # refused (quota): nothing to keep
    if isinstance(event, ExperimentCancelRequested):
        return {"cancelled": True}, [campaign.cancel_before_start(req, event)]
    c, out = campaign.start(req, warm_start(shared, req, at), deck)
    if c is None:
        return None, out  # the deck changed since the request was accepted
    codec = default_codec()
    for waiting_data, waiting_at in state.get("waiting", []):
        out += _apply(c, codec.decode(base64.b64decode(waiting_data)), waiting_at)
    remember(shared, c, out, record.partition)
    return _saved(c), out


def build_app(cfg: Config, **settings):
    decide = functools.partial(handle, deck=cfg.deck_layout)
    return faust_runtime.build_app(cfg, PROCESS, INPUTS, decide, accepts=ACCEPTS,
                                   table="campaigns", shared_table="scored-wells", **settings)


def run(cfg: Config) -> None:
    """Run the experiment worker until SIGINT/SIGTERM; start more and they share the
    partitions."""
    faust_runtime.run(build_app(cfg), cfg)
