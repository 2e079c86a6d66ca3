"""A TCP relay in front of a real redis-server that a test can cut and restore, or whose replies it can
hold, while Redis keeps its data (stopping the server would lose what the test needs to see)."""

from __future__ import annotations

import asyncio
import contextlib


class RedisRelay:
    """``async with RedisRelay(port) as relay``: clients connect to ``relay.url``. ``cut()`` drops every
    connection and refuses new ones until ``restore()``; clearing ``replies`` holds what Redis answers
    (commands still reach it and run) until it is set again."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.down = False
        self.replies = asyncio.Event()
        self.replies.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RedisRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.down = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: asyncio.Event | None) -> None:
            try:
                while data := await src.read(65536):
                    if held is not None:
                        await held.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, self.replies))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
