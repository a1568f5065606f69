"""A loopback TCP proxy the tests can cut: how a database outage looks from a client (connections
reset, new ones refused) without stopping a server other tests share. It can also hold back what
the server sends while the clients' bytes still go through (a return path that stalls)."""

from __future__ import annotations

import asyncio
import socket
import threading


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.replies = asyncio.Event()  # set: the server's bytes are passed on
        self.replies.set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.restore()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        """Accept connections again."""

        async def listen():
            self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port,
                                                     reuse_address=True)
        self._call(listen())

    def cut(self) -> None:
        """Reset every open connection and refuse new ones; replies held back are dropped (new
        connections pass them on again)."""

        async def close():
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()
            self.replies.set()  # the held copies write into aborted connections: dropped
            await self.server.wait_closed()
        self._call(close())

    def hold_replies(self) -> None:
        """Keep what the server sends (TCP buffered here) instead of passing it on, while the
        clients' bytes still reach the server; until `cut` (which drops it)."""

        async def hold():
            self.replies.clear()
        self._call(hold())

    def close(self) -> None:
        try:
            self.cut()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _pipe(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def copy(src, dst, gate=None):
            try:
                while data := await src.read(65536):
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer, self.replies))
        self.writers -= {writer, up_writer}
