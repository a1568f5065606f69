"""The event loop every labbus process runs (events/kafka.py `install_event_loop`): closing a TLS
connection whose peer never answers the close_notify (as the Kafka broker sometimes does) ends
after TLS_CLOSE_TIMEOUT_S, not after the loop's default 30 s: a faust worker's consumer thread
waited that long for it after SIGTERM. A real TLS server on loopback, no Kafka."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import uvloop

from labbus.events import pki
from labbus.events.kafka import TLS_CLOSE_TIMEOUT_S, install_event_loop


def silent_tls_server(tmp_path):
    """A TLS server that completes each handshake, then neither reads nor closes: a client's
    close_notify stays unanswered. (port, stop)."""
    p = pki.init_ca(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(p.server_cert, p.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            held.append(ctx.wrap_socket(conn, server_side=True))  # the handshake, then silence

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        for s in held:
            s.close()
        listener.close()

    return listener.getsockname()[1], p.ca_cert, stop


async def open_and_close(port: int, ca, wait_s: float) -> float | None:
    """Seconds from the client's close to the connection being gone (None: still closing after
    `wait_s`)."""
    client = ssl.create_default_context(cafile=str(ca))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    writer.write(b"a request\n")
    await writer.drain()
    t0 = time.monotonic()
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), wait_s)
    except TimeoutError as e:
        if "SSL shutdown timed out" not in str(e):  # the transport's own timeout: it is gone
            writer.transport.abort()
            return None
    return time.monotonic() - t0


def close_time(port: int, ca, loop: asyncio.AbstractEventLoop, wait_s: float) -> float | None:
    try:
        return loop.run_until_complete(open_and_close(port, ca, wait_s))
    finally:
        loop.close()


def test_a_tls_close_the_peer_never_answers_ends_after_the_short_timeout(tmp_path):
    port, ca, stop = silent_tls_server(tmp_path)
    before = asyncio.get_event_loop_policy()
    try:
        # uvloop as it comes: still closing well past the short timeout (the server is silent)
        assert close_time(port, ca, uvloop.new_event_loop(), TLS_CLOSE_TIMEOUT_S + 1.5) is None
        install_event_loop()
        loop = asyncio.new_event_loop()
        assert isinstance(loop, uvloop.Loop)
        took = close_time(port, ca, loop, 20)
    finally:
        asyncio.set_event_loop_policy(before)
        stop()
    # it waited for the close_notify, then let the connection go, well before 30 s
    assert took is not None and TLS_CLOSE_TIMEOUT_S - 0.5 <= took <= TLS_CLOSE_TIMEOUT_S + 3, took
