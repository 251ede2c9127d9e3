"""What happened on this peer, in order: joins, suspicions, deaths, plans with their reasons,
KV handoffs and replays. Kept for status and the dashboard, counted for /metrics, and logged
one line each with the node and the plan epoch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

KEPT = 200  # events kept for status and the dashboard


@dataclass(frozen=True)
class Event:
    seq: int
    t: float  # wall-clock seconds
    kind: str  # member, plan, plan-error, handoff, replay, peer
    text: str
    epoch: tuple[int, str] | None
    tag: str = ""  # a detail to count by (a member's new state)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "t": round(self.t, 3),
            "kind": self.kind,
            "text": self.text,
            "epoch": list(self.epoch) if self.epoch else None,
        }


class EventLog:
    def __init__(self, node: str, wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.epoch: tuple[int, str] | None = None
        self._wall = wall
        self._events: deque[Event] = deque(maxlen=KEPT)
        self._seq = 0
        self._listeners: list[Callable[[Event], None]] = []
        self._changed: asyncio.Event | None = None

    def add(self, kind: str, text: str, tag: str = "") -> Event:
        self._seq += 1
        event = Event(self._seq, self._wall(), kind, text, self.epoch, tag)
        self._events.append(event)
        epoch = f"{self.epoch[0]}/{self.epoch[1]}" if self.epoch else "-"
        logger.info(
            "[%s @%s] %s",
            self.node,
            epoch,
            text,
            extra={"node": self.node, "epoch": epoch, "kind": kind},
        )
        for listen in self._listeners:
            listen(event)
        if self._changed is not None:
            self._changed.set()
        return event

    def listen(self, callback: Callable[[Event], None]) -> None:
        self._listeners.append(callback)

    def since(self, seq: int) -> list[Event]:
        return [e for e in self._events if e.seq > seq]

    @property
    def last_seq(self) -> int:
        return self._seq

    async def wait(self, seq: int, timeout: float) -> None:
        """Until an event after `seq` exists, or `timeout` passes."""
        if self._seq > seq:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass
