"""The `n` answers of one API request, run at once: the mesh batches them as it does any
answers asked together.

Each choice's pieces come from its own generator, driven by its own task, and meet in one
queue in the order they arrive: a stream interleaves them by `index`, as OpenAI's does. The
request's status is decided once every choice has its first piece (a chain with no room for
one of them refuses before any text goes out); closing ends every choice's session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

# (text piece, finish reason or None), as OpenAIApi._text yields them
Source = AsyncGenerator[tuple[str, str | None], None]
# choice index, then a piece; an error the choice met; or None once it ended
_Item = tuple[int, tuple[str, str | None] | Exception | None]


class Choices:
    def __init__(self, sources: Sequence[Source]) -> None:
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._early: list[_Item] = []  # what came while waiting for every first piece
        self._tasks = [asyncio.create_task(self._drive(i, s)) for i, s in enumerate(sources)]

    async def _drive(self, index: int, source: Source) -> None:
        try:
            async with contextlib.aclosing(source):
                async for piece in source:
                    self._queue.put_nowait((index, piece))
        except Exception as e:  # the chain's errors, for the request to answer with
            self._queue.put_nowait((index, e))
        else:
            self._queue.put_nowait((index, None))

    async def started(self) -> None:
        """Once every choice has given its first piece; or the first error one met before."""
        waiting = set(range(len(self._tasks)))
        while waiting:
            index, item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            self._early.append((index, item))
            waiting.discard(index)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(index, text piece, finish reason or None) of every choice, as they come, from
        the first (after `started`); an error a choice meets is raised here."""
        ended = 0
        while ended < len(self._tasks):
            index, item = self._early.pop(0) if self._early else await self._queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                ended += 1
                continue
            yield index, *item

    async def aclose(self) -> None:
        """End every choice still running (a client hanging up, an error in another)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
