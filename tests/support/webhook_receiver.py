"""A real HTTP receiver for webhook tests: Python's http.server on loopback, in a thread,
recording every request it gets and answering as the test decides."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from labbus.events.model import AnomalyDetected, utcnow


@dataclass
class Received:
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.time() when it arrived
    status: int | None = None  # what the receiver answered (None while it has not)
    path: str = ""

    @property
    def event_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def document(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """`answer(received) -> status`: called for each request (may block, e.g. on an Event);
    the default accepts everything with 204."""

    def __init__(self, answer: Callable[[Received], int] | None = None) -> None:
        self.answer = answer or (lambda r: 204)
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                got = Received({k.lower(): v for k, v in self.headers.items()}, body, time.time(),
                               path=self.path)
                with receiver.lock:
                    receiver.requests.append(got)
                status = receiver.answer(got)
                got.status = status
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone (killed mid-request)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def of(self, event_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.event_id == event_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def failing_first(n: int, mine: Callable[[Received], bool], status: int = 503
                  ) -> Callable[[Received], int]:
    """An answer that refuses the first `n` requests of each event `mine` selects with `status`
    and accepts the rest (and every other event at once: other tests' events share the
    namespace)."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def answer(r: Received) -> int:
        if not mine(r):
            return 204
        with lock:
            seen[r.event_id] = seen.get(r.event_id, 0) + 1
            return status if seen[r.event_id] <= n else 200

    return answer


def anomaly(device: str, value: float = 48.5) -> AnomalyDetected:
    """An event to forward: an AnomalyDetected of `device`, made now."""
    return AnomalyDetected.create(
        source="test", subject=device, sequence=1, device_id=device, metric="temperature",
        value=value, unit="degC", measured_at=utcnow(), measurement_id=uuid.uuid4(),
        rule="zscore", score=9.5, threshold=4.0, window_mean=21.0, window_stddev=0.4,
        window_count=40)
