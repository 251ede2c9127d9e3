"""An in-memory network for ControlNodes: delays, drops and partitions, no sockets."""

from __future__ import annotations

import asyncio
import random

from meshshard.config import TEST_TIMINGS, Timings
from meshshard.mesh.node import ControlNode, TransportError
from meshshard.types import Epoch, LinkStat, Member, NodeId, PlanRecord, Profile, State, UnitCost
from meshshard.wire import ControlMessage, decode, encode

UNITS = [UnitCost(f"U{i}", 100, 0, 1000) for i in range(8)]


class SimNet:
    def __init__(
        self, seed: int = 0, delay: tuple[float, float] = (0.001, 0.004), drop: float = 0.0
    ):
        self.rng = random.Random(seed)
        self.nodes: dict[str, ControlNode] = {}
        self.delay = delay
        self.drop = drop
        self.groups: list[set[str]] | None = None  # a partition: only within a group
        self.down: set[str] = set()  # addresses that answer nothing (a host gone silent)
        self.closed: set[str] = set()  # crashed processes: their host refuses at once

    def reachable(self, src: str, dst: str) -> bool:
        if dst in self.down or src in self.down or dst in self.closed or dst not in self.nodes:
            return False
        return self._connected(src, dst)

    def _connected(self, src: str, dst: str) -> bool:
        """Not kept apart by a partition."""
        return self.groups is None or any(src in g and dst in g for g in self.groups)

    async def deliver(
        self, src: str, dst: str, msg: ControlMessage, timeout: float
    ) -> ControlMessage:
        async def go() -> ControlMessage:
            await asyncio.sleep(self.rng.uniform(*self.delay))
            if dst in self.closed and src not in self.down and self._connected(src, dst):
                raise TransportError("connection refused", refused=True)
            if not self.reachable(src, dst) or self.rng.random() < self.drop:
                await asyncio.sleep(timeout * 2)
                raise TransportError("lost")
            # Through the real codec, so the sim exercises what goes on the wire.
            reply = await self.nodes[dst].handle(decode(encode(msg)))
            await asyncio.sleep(self.rng.uniform(*self.delay))
            if not self.reachable(dst, src):
                await asyncio.sleep(timeout * 2)
                raise TransportError("lost")
            return decode(encode(reply))

        try:
            async with asyncio.timeout(timeout):
                return await go()
        except TimeoutError:
            raise TransportError("timeout") from None


class SimTransport:
    def __init__(self, net: SimNet, addr: str) -> None:
        self.net, self.addr = net, addr

    async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage:
        return await self.net.deliver(self.addr, addr, msg, timeout)

    async def measure(self, addr: str, timeout: float) -> LinkStat:
        if not self.net.reachable(self.addr, addr):
            raise TransportError("unreachable")
        return LinkStat(mbps=1000.0, rtt_ms=2.0)


def make_node(
    net: SimNet,
    index: int,
    plans: dict[NodeId, list[Epoch]],
    timings: Timings = TEST_TIMINGS,
    mem: float = 500.0,
    priority: int = 0,
) -> ControlNode:
    node_id = NodeId(f"n{index:02d}")
    addr = f"10.9.0.{index + 1}:7000"  # only a dictionary key: nothing is sent anywhere
    me = Member(node_id, addr, incarnation=1, state=State.ALIVE, priority=priority)
    profile = Profile(node_id, 1, "tiny", mem, tuple([1.0] * len(UNITS)), measured=True)
    plans[node_id] = []

    def on_plan(plan: PlanRecord) -> None:
        plans[node_id].append(plan.epoch)

    node = ControlNode(
        me=me,
        profile=profile,
        units=UNITS,
        timings=timings,
        transport=SimTransport(net, addr),
        rng=random.Random(index),
        on_plan=on_plan,
    )
    net.nodes[addr] = node
    return node
