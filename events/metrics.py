"""Prometheus metrics shared by every labbus process (labelled by process name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter("labbus_events_in_total", "Events consumed", ["process", "topic"])
EVENTS_OUT = Counter("labbus_events_out_total", "Events produced or projected",
                     ["process", "topic"])
EVENTS_REJECTED = Counter("labbus_events_rejected_total", "Events rejected or dead-lettered",
                          ["process", "reason"])
PROCESSING_SECONDS = Histogram(
    "labbus_processing_seconds", "Time to process one batch of events", ["process"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CONSUMER_LAG = Gauge("labbus_consumer_lag", "Messages behind the log end",
                     ["process", "topic", "partition"])
REDELIVERIES = Counter("labbus_faust_redeliveries_total",
                       "Input partitions faust read past records it never delivered, sought back",
                       ["process", "topic"])
SINK_ERRORS = Counter("labbus_sink_errors_total",
                      "Failed attempts to reach a database or the broker (retried)",
                      ["process", "sink"])
STALLED = Gauge("labbus_stalled", "1 while the process waits for a database or the broker",
                ["process"])
LAST_PROGRESS = Gauge("labbus_last_progress_timestamp_seconds",
                      "When the process last wrote or committed anything (Unix time)", ["process"])


def record_lag(process: str, topic: str, partition: int, next_offset: int,
               end: int | None) -> None:
    """Messages between a consumer's next offset and the partition's end, once the end is known."""
    if end is not None:
        CONSUMER_LAG.labels(process, topic, partition).set(max(end - next_offset, 0))


DEFAULT_PORTS = {"agent": 9101, "validator": 9102, "projector-postgres": 9103,
                 "projector-mongo": 9104, "experiment": 9105, "agent-ot2": 9106,
                 "agent-reader": 9107, "gateway-grpc": 9108, "agent-sila2": 9109,
                 "devices": 9111, "anomalies": 9112, "quota": 9113,
                 "testing": 9114, "agent-pv": 9115,
                 "webhooks": 9116, "reports": 9117}


def serve(process: str, port: int) -> int:
    """Expose /metrics for a worker process; port 0 means the process's default port."""
    port = port or DEFAULT_PORTS.get(process, 9100)
    start_http_server(port, addr="127.0.0.1")
    return port
