"""A whole mesh in one process: control nodes over SimNet, chain services over an in-memory
data-plane network, one tiny random model. Peers crash, join and leave as real ones do, in
seconds, with no socket and no subprocess; frames still go through the real wire codec."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshshard.chain.lanes import fitted
from meshshard.chain.links import Dispatch, LinkError, LinkWatch, Refusals
from meshshard.chain.service import ChainService
from meshshard.config import TEST_TIMINGS, Config, Timings
from meshshard.events import EventLog
from meshshard.mesh.node import ControlNode
from meshshard.mesh.seam import NodeSeam
from meshshard.model.batching import BATCHES
from meshshard.model.costs import read_spec, unit_costs
from meshshard.model.device import Device, Placement
from meshshard.types import Member, NodeId, Profile, State
from meshshard.wire import MAX_FRAME_LIMIT, DataFrame, decode_frame, encode_frame
from support.simnet import SimNet, SimTransport

# Shrunk further than the tests' preset: nothing here waits on a real network.
SIM_TIMINGS = replace(
    TEST_TIMINGS, left_behind_keep=2.0, sweep_interval=0.2, same_plan_grace=1.0, link_interval=60
)
CPU = Placement(Device("cpu"), "float32")
QUEUE = 64  # frames in flight on one link before its sender waits, as a socket's buffers


class DataNet:
    """Frames between chain services: each link a queue drained by one task, in order, with
    an optional delay. A peer that is down receives nothing; one that crashed sends nothing
    more either, not even what it had queued (a peer that leaves flushes its links)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.services: dict[str, ChainService] = {}
        self.down: set[str] = set()
        self.crashed: set[str] = set()
        self.delay = delay
        self.delivered = 0
        self.links: list[MemoryLinks] = []
        self.watches: dict[str, LinkWatch] = {}  # who hears of frames arriving at each address
        # The largest frame a link carries (None: any), and the largest each peer takes (its
        # --max-frame, which its profile says): larger ones go in pieces, as on a socket
        # (lanes.fitted), and a piece still larger is refused. Frames so cut, by kind.
        self.max_frame: int | None = None
        self.takes: dict[str, int] = {}
        self.cut: Counter[str] = Counter()

    def crash(self, addr: str) -> None:
        """A process crashed: its kernel closes its sockets, so every peer with a link to it
        notices at once, as from a connection closed under it."""
        self.down.add(addr)
        self.crashed.add(addr)
        for links in self.links:
            links.lost(addr)


class MemoryLinks:
    """`chain.links.DataLinks` over a DataNet."""

    def __init__(self, net: DataNet, me: str, watch: LinkWatch, tg: asyncio.TaskGroup) -> None:
        self._net, self._me, self._watch, self._tg = net, me, watch, tg
        self._queues: dict[str, asyncio.Queue[DataFrame]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.sent_bytes: Counter[str] = Counter()
        self.forgotten: list[str] = []  # sessions whose drop came, in order
        net.links.append(self)
        net.watches[me] = watch

    def lost(self, addr: str) -> None:
        if addr in self._queues and self._me not in self._net.down:
            self._watch.unreachable(addr)

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        return False  # frames in memory go by their carrier tasks

    def forget(self, session: str) -> None:
        """Frames between services in memory are not lost unseen: only noted."""
        self.forgotten.append(session)

    async def send(self, addr: str, frame: DataFrame) -> None:
        if self._closed:  # as a socket closed under its writer: the frame is lost, said so
            raise LinkError(f"links of {self._me} are closed")
        if self._me in self._net.down or addr in self._net.down or addr not in self._net.services:
            if self._me not in self._net.down:
                self._watch.unreachable(addr)
            raise LinkError(f"cannot reach {addr}")
        queue = self._queues.get(addr)
        if queue is None:
            queue = asyncio.Queue(QUEUE)
            try:
                self._tasks.append(self._tg.create_task(self._carry(addr, queue)))
            except RuntimeError:  # the service's task group ended: no link opens now
                raise LinkError(f"links of {self._me} are closing") from None
            self._queues[addr] = queue
        carried = self._net.max_frame or MAX_FRAME_LIMIT
        pieces = fitted(frame, min(carried, self._watch.frame_limit(addr) or carried))
        if len(pieces) > 1:
            self._net.cut[type(frame).__name__] += 1
        takes = min(carried, self._net.takes.get(addr, carried))
        for piece in pieces:
            data = encode_frame(piece)  # what goes on the wire, and back through its decoder
            if len(data) > takes:
                raise LinkError(f"{addr}: frame of {len(data)} bytes exceeds {takes}")
            self.sent_bytes[addr] += len(data)
            await queue.put(decode_frame(data))

    async def _carry(self, addr: str, queue: asyncio.Queue[DataFrame]) -> None:
        while True:
            frame = await queue.get()
            try:
                if self._net.delay:
                    await asyncio.sleep(self._net.delay)
                if self._me in self._net.crashed or addr in self._net.down:
                    continue  # lost with the peer that crashed
                target = self._net.services.get(addr)
                if target is not None:
                    self._net.delivered += 1
                    if (watch := self._net.watches.get(addr)) is not None:
                        watch.heard(self._me)
                    await target.handle_frame(frame)
            finally:
                queue.task_done()

    async def close(self) -> None:
        """Flush what is queued, as closing a socket does, then stop; what is sent from now
        on is refused, as on a closed socket."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for queue in list(self._queues.values()):
                    await queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._net.links.remove(self)


@dataclass
class SimPeer:
    name: NodeId
    addr: str
    node: ControlNode
    service: ChainService
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class SimMesh:
    """Peers of one tiny model; each offers `memory` bytes. Use as an async context."""

    def __init__(
        self,
        model_dir: Path,
        memory: float,
        timings: Timings = SIM_TIMINGS,
        seed: int = 0,
        placement: Placement = CPU,
        speculate: int = Config.speculate,
    ) -> None:
        self.model_dir, self.memory, self.timings = model_dir, memory, timings
        self.speculate = speculate
        self.placement = placement
        self.spec = read_spec(model_dir)
        self.units = unit_costs(model_dir, placement.dtype, placement.quantize)
        self.control = SimNet(seed=seed)
        self.data = DataNet()
        self.peers: dict[str, SimPeer] = {}
        self._tg = asyncio.TaskGroup()
        self._rng = random.Random(seed)
        self._added = 0

    async def __aenter__(self) -> SimMesh:
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for peer in list(self.peers.values()):
            await self._stop(peer)
        await self._tg.__aexit__(None, None, None)

    def add(
        self,
        name: str,
        priority: int = 0,
        memory: float | None = None,
        frame: int = 0,
        unit_ms: float = 0.1,
        batches: bool = False,
        row_share: float = 1 / 64,
    ) -> SimPeer:
        """Start a peer and introduce it to the first one; `frame`: the largest data-plane
        frame it takes (0: any), as its profile says; each unit's step `unit_ms` in its
        profile, and passes of several rows (`batches`) timed at one's and `row_share` of it
        a row more (by default little more than one's)."""
        self._added += 1
        addr = f"10.7.0.{self._added}:7000"  # never reused, as a restarted peer's port may be
        node_id = NodeId(name)
        mem = self.memory if memory is None else memory
        me = Member(node_id, addr, 1, State.ALIVE, priority)
        ms = tuple(unit_ms for _ in self.units)
        grown = (tuple(x * (1 + n * row_share) for x in ms) for n in BATCHES)
        batch_ms = tuple(grown) if batches else ()
        profile = Profile(
            node_id, 1, self.spec.name, mem, ms, measured=True, frame=frame, batch_ms=batch_ms
        )
        if frame:
            self.data.takes[addr] = frame
        node = ControlNode(
            me=me,
            profile=profile,
            units=self.units,
            timings=self.timings,
            transport=SimTransport(self.control, addr),
            rng=random.Random(self._rng.random()),
            events=EventLog(node_id),
        )
        self.control.nodes[addr] = node

        def connect(
            dispatch: Dispatch, watch: LinkWatch, tg: asyncio.TaskGroup, refusals: Refusals
        ) -> MemoryLinks:
            return MemoryLinks(self.data, addr, watch, tg)

        service = ChainService(
            NodeSeam(node), self.model_dir, self.placement, self.spec,
            connect, node.events, mem, node.clock, self.timings, self.speculate,
        )  # fmt: skip
        self.data.services[addr] = service
        peer = SimPeer(node_id, addr, node, service)
        peer.tasks = [self._tg.create_task(node.run()), self._tg.create_task(service.run())]
        if self.peers:
            node.join(next(iter(self.peers.values())).addr)
        self.peers[name] = peer
        return peer

    def kill(self, name: str, silent: bool = False) -> None:
        """Crash a peer: from now on it sends and answers nothing (its tasks end later).
        Its host refuses connections to it at once, and peers with a link to it see the
        link close; `silent`: the host is gone too (no answer at all, nothing closes)."""
        peer = self.peers.pop(name)
        if silent:
            self.control.down.add(peer.addr)
            self.data.down.add(peer.addr)
            self.data.crashed.add(peer.addr)
        else:
            self.control.closed.add(peer.addr)
            self.data.crash(peer.addr)
        self._tg.create_task(self._stop(peer))

    async def leave(self, name: str) -> bool:
        """A graceful leave, as `meshshard up` does on Ctrl-C; whether it handed over."""
        peer = self.peers[name]
        await peer.node.drain()
        await peer.service.origin.drain(self.timings.drain_timeout)
        handed = await peer.service.hand_over(self.timings.hand_over_timeout)
        await peer.node.stop(leave=True)
        del self.peers[name]
        await self._stop(peer)
        self.data.down.add(peer.addr)
        return handed

    async def _stop(self, peer: SimPeer) -> None:
        await peer.node.stop(leave=False)
        for task in peer.tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*peer.tasks, return_exceptions=True)

    def agreed(self, stages: int) -> bool:
        """Every peer follows one plan of `stages` stages, on live peers, and its chain is
        ready everywhere."""
        plans = {p.node.book.current for p in self.peers.values()}
        if len(plans) != 1:
            return False
        (plan,) = plans
        return (
            plan is not None
            and len(plan.stages) == stages
            and all(s.device in self.peers for s in plan.stages)
            and all(p.node.chain_ready(plan) for p in self.peers.values())
        )

    def holding(self) -> dict[str, dict[str, int]]:
        """What each peer still holds for answers: stage sessions, reservations, left-behind
        caches, open origin sessions (all 0 once every answer is done and swept)."""
        out = {}
        for name, p in self.peers.items():
            stage = p.service.follower.stage
            out[name] = {
                "stage": len(stage.shard.sessions) if stage else 0,
                "reserved": p.service.follower.budget.reserved,
                "left_behind": len(p.service.follower.left_behind),
                "origin": p.service.origin.open_sessions,
            }
        return out

    def idle(self) -> bool:
        return all(not any(v.values()) for v in self.holding().values())
