"""The data plane of one peer: a thin router between the links, the stage side (`follower.py`:
plans, steps, caches) and the origin side (`origin.py`: answers), with one lifecycle and one
stats object. It sees the control plane only through `seam.ControlPlane`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from meshshard.chain.follower import PlanFollower
from meshshard.chain.links import DataLinks, Dispatch, LinkError, LinkWatch, Refusals
from meshshard.chain.origin import Origin
from meshshard.chain.seam import ControlPlane
from meshshard.chain.stage import Observe
from meshshard.chain.stats import ChainStats
from meshshard.clock import Clock, Pulse
from meshshard.config import Timings
from meshshard.events import EventLog
from meshshard.model.device import Placement
from meshshard.model.spec import ModelSpec
from meshshard.rounds import rounds
from meshshard.wire import (
    DataFrame,
    DropFrame,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    PickFrame,
    StepFrame,
    TokenFrame,
)

logger = logging.getLogger(__name__)

# Links to other peers, made once the service runs, from where frames that arrive go, who
# hears of peers lost and heard from, the task group, and what counts refused ones.
Connect = Callable[[Dispatch, LinkWatch, asyncio.TaskGroup, Refusals], DataLinks]
LOCAL_FRAMES = 64  # frames to ourselves in flight before the sender waits, as a socket's buffers


class ChainService:
    def __init__(
        self,
        control: ControlPlane,
        model_dir: Path,
        placement: Placement,
        spec: ModelSpec,
        connect: Connect,
        events: EventLog,
        memory: float,
        clock: Clock,
        timings: Timings,
        speculate: int = 0,
    ) -> None:
        self.control, self.events = control, events
        self.clock, self.timings = clock, timings
        self.stats = ChainStats()
        self.refusals = Refusals()
        self.pulse = Pulse()  # fires on any change either side may wait for
        self._local: asyncio.Queue[DataFrame] = asyncio.Queue(LOCAL_FRAMES)
        self.follower = PlanFollower(
            control, model_dir, placement, spec, memory, self._send, self._tell, events,
            self.stats, self.pulse, clock, timings, send_now=self._send_now,
        )  # fmt: skip
        self.origin = Origin(
            control, spec, self._send, events, self.stats, self.pulse, clock, timings, speculate
        )
        self._connect = connect
        self._links: DataLinks | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.loop_errors: Counter[str] = Counter()  # rounds of our loops that failed

    def observe(self, callback: Observe) -> None:
        """Be told of every batch this peer's stages run (for metrics)."""
        self.follower.observe = callback

    def sent_bytes(self) -> dict[str, int]:
        return dict(self._links.sent_bytes) if self._links else {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; then stop the stage and close every socket."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._links = self._connect(self.handle_frame, self.control, tg, self.refusals)
            self.origin.start(tg)
            sweep = rounds("sweep", self.follower.sweep, self.loop_errors, self.clock.sleep)
            loops = [
                tg.create_task(self.follower.follow(tg)),
                tg.create_task(sweep),
                tg.create_task(self._relay()),
                tg.create_task(self._loopback()),
            ]
            try:
                await asyncio.Event().wait()  # until cancelled
            finally:
                for task in loops:
                    task.cancel()
                await self.follower.close()
                await self._links.close()

    async def _relay(self) -> None:
        """Changes of the control plane wake whoever waits on this service's pulse."""
        seen = self.control.version
        while True:
            seen = await self.control.changed(seen)
            self.pulse.fire()

    async def hand_over(self, deadline: float) -> bool:
        """Leaving: wait (until `deadline` seconds) for a plan without us to take over and for
        the caches we held to be handed off or freed. False if the mesh could not take over."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                while True:
                    seen = self.pulse.version
                    if self.follower.done():
                        return True
                    if not self.control.plan_possible():
                        return False  # nobody (or not enough memory) to take over
                    await self.pulse.after(seen)
        return False

    # -- frames ------------------------------------------------------------------------------

    async def handle_frame(self, frame: DataFrame) -> None:
        match frame:
            case StepFrame() | KVFrame() if self.follower.ended(frame.session):
                return  # late news of an answer its origin ended: nothing to hold for it
            case StepFrame():
                await self.follower.serve(frame)
            case PickFrame():
                self.follower.take_pick(frame)
            case DropFrame():
                if self._links is not None:
                    self._links.forget(frame.session)
                await self.follower.forget(frame.session)
            case HandoffRequest():
                assert self._tg is not None
                self._tg.create_task(self.follower.hand_off(frame))
            case KVFrame():
                await self.follower.take_kv(frame)
            case TokenFrame() | ErrorFrame() | HandoffDone():
                self.origin.deliver(frame)

    def handle_now(self, frame: DataFrame, more: bool) -> bool:
        """`handle_frame` without waiting, from the callback that read the frame (a raw
        link's): a step whose pass is short runs here, unless `more` steps came with it.
        False: nothing done, `handle_frame` it."""
        match frame:
            case StepFrame() if self.follower.ended(frame.session):
                return True
            case StepFrame():
                return self.follower.serve_now(frame, at_once=not more)
            case PickFrame():
                self.follower.take_pick(frame)
                return True
            case TokenFrame() | ErrorFrame():
                self.origin.deliver(frame)
                return True
        return False

    def _send_now(self, addr: str, frame: DataFrame) -> bool:
        if addr == self.control.address:
            # News of our own answers goes to them here rather than by the loopback task:
            # a task's wake waits a turn of the loop, and on a busy stage a turn holds a
            # pass run on the loop (stage.py `_run_now`; chain/inbox.py).
            if isinstance(frame, TokenFrame | ErrorFrame) and self._local.empty():
                self.origin.deliver(frame)
                return True
            if self._local.full():
                return False
            self._local.put_nowait(frame)
            return True
        return self._links is not None and self._links.send_now(addr, frame)

    async def _send(self, addr: str, frame: DataFrame) -> None:
        if addr == self.control.address:
            # To ourselves (an origin that is also the first or last stage): in order and
            # with backpressure, as a socket would, but never sealed, sent or decoded.
            await self._local.put(frame)
            return
        assert self._links is not None
        await self._links.send(addr, frame)

    async def _loopback(self) -> None:
        while True:
            frame = await self._local.get()
            try:
                await self.handle_frame(frame)
            except Exception:  # a bug must cost this frame, not the peer (as on a socket)
                logger.exception("a frame to ourselves failed")
                self.loop_errors["loopback"] += 1

    async def _tell(self, addr: str, frame: DataFrame) -> None:
        """Send, where a failure is only the receiver's loss (an origin gone, say)."""
        with contextlib.suppress(LinkError):
            await self._send(addr, frame)
