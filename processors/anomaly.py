"""The anomaly processor: rolling statistics per device and metric flag outliers as AnomalyDetected.

Input: MeasurementValidated (lab.measurements.validated, keyed by device id). State: the faust
Table `anomaly-stats` keyed by device id (`labbus.events.faust_runtime`, changelog-backed, so a
restarted or newly assigned worker recovers it from the changelog and needs no new warm-up): per
device `{"offset": last input offset handled, "metrics": {metric: [n, mean, variance]}}`.

The statistics (plain functions below, tested without services): an exponentially weighted mean
and variance with weight `alpha` (LABBUS_ANOMALY_ALPHA), which for the first 1/alpha readings is
the plain running mean and variance (Welford: weight 1/n), so a young window is not biased to its
first reading. A reading is judged against the window *before* it: once the window holds
`warmup` readings (LABBUS_ANOMALY_WARMUP), |value - mean| / stddev above `threshold`
(LABBUS_ANOMALY_THRESHOLD) is an anomaly: one AnomalyDetected on lab.alerts (rule `zscore`, the
score, the threshold and the window), id derived from the measurement id. Flagged, not dropped:
the reading stays validated; it enters the window clipped to mean ± threshold·stddev, so one
spike does not blind the window to the next, while a lasting level shift is absorbed within
about 1/alpha readings. Readings of quality `bad` (they break the device's spec: wrong unit, out
of range; processors/quality.py) are neither judged nor counted: they already carry their flag,
and a wrong unit would poison the statistics.
"""

from __future__ import annotations

import math
import uuid

from labbus.events import faust_runtime
from labbus.events.config import Config
from labbus.events.model import AnomalyDetected, Event, MeasurementValidated, derived_id
from labbus.events.runtime import Record
from labbus.events.topics import MEASUREMENTS_VALIDATED

PROCESS = "anomalies"
INPUTS = (MEASUREMENTS_VALIDATED,)
ACCEPTS = {MeasurementValidated.TYPE}
RULE = "zscore"

# [n, mean, variance] of one device and metric
Stats = list


def update(stats: Stats | None, x: float, alpha: float) -> Stats:
    """The window after `x`: weight max(alpha, 1/n) (running mean and variance first, then
    exponentially weighted)."""
    if stats is None or stats[0] == 0:
        return [1, x, 0.0]
    n, mean, var = stats
    weight = max(alpha, 1.0 / (n + 1))
    diff = x - mean
    incr = weight * diff
    return [n + 1, mean + incr, (1.0 - weight) * (var + diff * incr)]


def stddev(stats: Stats) -> float:
    """The window's standard deviation, floored so a constant series still gives a finite
    score."""
    return max(math.sqrt(max(stats[2], 0.0)), 1e-9 * max(1.0, abs(stats[1])))


def score(stats: Stats, x: float) -> float:
    """|z| of `x` against the window."""
    return abs(x - stats[1]) / stddev(stats)


def observe(stats: Stats | None, x: float, alpha: float, warmup: int,
            threshold: float) -> tuple[Stats, float | None]:
    """Judge `x` against the window, then add it: (new window, score when flagged else None).
    A flagged value enters the window clipped to mean ± threshold·stddev."""
    if stats is None or stats[0] < warmup:
        return update(stats, x, alpha), None
    z = score(stats, x)
    if z <= threshold:
        return update(stats, x, alpha), None
    bound = threshold * stddev(stats)
    clipped = min(max(x, stats[1] - bound), stats[1] + bound)
    return update(stats, clipped, alpha), z


def handle(state: dict | None, event: Event, record: Record, shared=None, *,
           alpha: float = 0.05, warmup: int = 20,
           threshold: float = 4.0) -> tuple[dict | None, list[Event]]:
    """One validated reading of one device: its table value before and after, and the alert if
    the reading is an anomaly. An input at or before the offset the state holds was handled
    already (a redelivery after a crash or rebalance): nothing changes."""
    if not isinstance(event, MeasurementValidated):
        return state, []
    if state is not None and record.offset <= state.get("offset", -1):
        return state, []
    metrics = dict(state["metrics"]) if state is not None else {}
    if event.quality == "bad":
        return {"offset": record.offset, "metrics": metrics}, []
    before = metrics.get(event.metric)
    after, z = observe(before, event.value, alpha, warmup, threshold)
    metrics[event.metric] = after
    new_state = {"offset": record.offset, "metrics": metrics}
    if z is None:
        return new_state, []
    alert = AnomalyDetected.create(
        source=PROCESS, subject=event.device_id, sequence=event.envelope.sequence,
        occurred_at=event.measured_at,
        event_id=uuid.UUID(derived_id(event.measurement_id, "anomaly")),
        correlation_id=event.envelope.correlation_id, causation_id=event.event_id,
        device_id=event.device_id, metric=event.metric, value=event.value, unit=event.unit,
        measured_at=event.measured_at, measurement_id=event.measurement_id, rule=RULE,
        score=z, threshold=threshold, window_mean=before[1], window_stddev=stddev(before),
        window_count=before[0])
    return new_state, [alert]


def build_app(cfg: Config, **settings):
    def decide(state, event, record, shared):
        return handle(state, event, record, shared, alpha=cfg.anomaly_alpha,
                      warmup=cfg.anomaly_warmup, threshold=cfg.anomaly_threshold)

    return faust_runtime.build_app(cfg, PROCESS, INPUTS, decide, accepts=ACCEPTS,
                                   table="anomaly-stats", **settings)


def run(cfg: Config) -> None:
    """Run the anomaly worker until SIGINT/SIGTERM; start more and they share the partitions."""
    faust_runtime.run(build_app(cfg), cfg)
