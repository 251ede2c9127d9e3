"""A TCP relay on loopback that behaves like a real network path: it cuts what passes into
small pieces with pauses between them (a body then arrives in many TCP segments), can delay
every piece, and can lose what it carries and then reset every connection (a NAT or firewall
that lost its state). It runs on a thread of its own, so sync tests and real processes can
use it.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType


class Relay:
    def __init__(
        self, target_port: int, listen_port: int, piece: int = 1448, pause: float = 0.0
    ) -> None:
        self.target_port, self.listen_port = target_port, listen_port
        self.piece, self.pause = piece, pause
        self.pieces = 0  # pieces forwarded, both ways
        self.cut = 0  # reads forwarded as more than one piece
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._losing = False

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def blackhole(self, seconds: float) -> None:
        """Lose everything that crosses for `seconds`, then reset every open connection;
        new ones pass again."""
        asyncio.run_coroutine_threadsafe(self._blackhole(seconds), self._loop).result(seconds + 10)

    async def _blackhole(self, seconds: float) -> None:
        self._losing = True
        await asyncio.sleep(seconds)
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        self._losing = False

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._open.update((writer, up_w))
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(64 * 1024):
                self.cut += len(data) > self.piece
                for i in range(0, len(data), self.piece):
                    if self.pause:
                        await asyncio.sleep(self.pause)
                    if not self._losing:
                        dst.write(data[i : i + self.piece])
                    await dst.drain()
                    self.pieces += 1
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()
            self._open.discard(dst)
