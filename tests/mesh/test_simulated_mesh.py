"""Many control nodes over an in-memory network with delays, drops and a partition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from support.simnet import SimNet, make_node

from meshshard.config import TEST_TIMINGS
from meshshard.mesh import report
from meshshard.mesh.node import ControlNode, PlanRefused
from meshshard.mesh.sanity import FUTURE_SECONDS, term_at
from meshshard.types import Epoch, Member, NodeId, State
from meshshard.wire import Ping


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - start


def agreed(nodes: list[ControlNode]) -> bool:
    """Everyone alive in everyone's view, one coordinator, and its plan, on live members only."""
    ids = {n.id for n in nodes}
    for n in nodes:
        live = {m.id for m in n.membership.members() if m.state == State.ALIVE}
        if live != ids:
            return False
    coordinators = {n.coordinator for n in nodes}
    plans = {n.book.current for n in nodes}
    if len(coordinators) != 1 or len(plans) != 1:
        return False
    (plan,) = plans
    return (
        plan is not None
        and plan.epoch.coordinator in coordinators
        and all(s.device in ids for s in plan.stages)
    )


async def start(net: SimNet, nodes: list[ControlNode]) -> asyncio.TaskGroup:
    tg = asyncio.TaskGroup()
    await tg.__aenter__()
    for n in nodes:
        tg.create_task(n.run())
    for n in nodes[1:]:
        # One seed given by hand (`--peer`), kept until it answers; gossip does the rest. (As
        # an address discovery found, it is forgotten after 3 failed tries in a row, 5 s here:
        # in one 12-peer run with 5% of messages lost, a peer no other ever heard from stayed
        # alone for the test's 20 s, most likely that way.)
        n.join(nodes[0].membership.me.addr, configured=True)
    return tg


async def stop(tg: asyncio.TaskGroup, nodes: list[ControlNode]) -> None:
    for n in nodes:
        await n.stop(leave=False)
    await tg.__aexit__(None, None, None)


@pytest.mark.parametrize("size, drop", [(5, 0.0), (12, 0.05), (20, 0.02)])
async def test_peers_converge_on_one_coordinator_and_plan(size: int, drop: float) -> None:
    net = SimNet(seed=size, drop=drop)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(size)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        assert nodes[0].coordinator == max(n.id for n in nodes)
        plan = nodes[0].book.current
        assert plan is not None and plan.epoch.coordinator == nodes[0].coordinator
        # 8 units of 100 bytes on devices of 500: the plan needs two devices.
        assert len(plan.stages) >= 2
        # Profiles without batch timings gain nothing from batching: the flow model finds
        # a wave a stage fastest, and the plan carries it to every peer.
        assert plan.waves == len(plan.stages)
        assert {n.book.current.waves for n in nodes if n.book.current} == {plan.waves}
    finally:
        await stop(tg, nodes)
    for history in plans.values():
        assert history == sorted(set(history)), "a peer applied an older or repeated epoch"


async def test_a_crashed_peer_is_declared_dead_and_the_plan_changes() -> None:
    net = SimNet(seed=1)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(6)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        before = nodes[0].book.epoch
        victim = nodes[-1]  # the coordinator, highest id
        net.down.add(victim.membership.me.addr)
        rest = nodes[:-1]

        def noticed() -> bool:
            return all(
                n.membership.get(victim.id) is not None
                and n.membership.get(victim.id).state == State.DEAD  # type: ignore[union-attr]
                for n in rest
            )

        took = await until(noticed, 10, "death of the crashed coordinator")
        assert took < 3.0
        await until(lambda: agreed(rest), 10, "agreement without it")
        after = rest[0].book.epoch
        assert after is not None and before is not None and after > before
        assert after.coordinator == max(n.id for n in rest)
        assert all(victim.id not in {s.device for s in n.book.current.stages} for n in rest)  # type: ignore[union-attr]
    finally:
        await stop(tg, nodes)


async def test_a_partition_heals_into_one_newer_epoch() -> None:
    net = SimNet(seed=7, drop=0.02)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(8)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        first = nodes[0].book.epoch
        left, right = nodes[:4], nodes[4:]
        net.groups = [{n.membership.me.addr for n in left}, {n.membership.me.addr for n in right}]
        await until(lambda: agreed(left) and agreed(right), 15, "each side to agree alone")
        sides = (left[0].book.epoch, right[0].book.epoch)
        assert left[0].coordinator != right[0].coordinator
        assert all(e is not None and first is not None and e > first for e in sides)
        assert sides[0] != sides[1], "two sides of a partition must never share an epoch"
        net.groups = None
        await until(lambda: agreed(nodes), 20, "agreement after healing")
        healed = nodes[0].book.epoch
        assert healed is not None and all(healed >= e for e in sides if e is not None)
    finally:
        await stop(tg, nodes)
    for history in plans.values():
        assert history == sorted(set(history)), "a peer applied an older or repeated epoch"


async def test_a_clean_leave_is_known_at_once() -> None:
    net = SimNet(seed=3)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(4)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        leaver = nodes[1]
        await leaver.stop(leave=True)
        net.down.add(leaver.membership.me.addr)
        rest = [n for n in nodes if n is not leaver]
        took = await until(
            lambda: all(n.membership.get(leaver.id).state == State.LEFT for n in rest),  # type: ignore[union-attr]
            5,
            "the leave to be known",
        )
        assert took < 0.5  # pushed directly, no suspicion timeout
    finally:
        await stop(tg, [n for n in nodes if n is not nodes[1]])


async def test_an_operator_excludes_a_member_and_the_exclusion_holds() -> None:
    net = SimNet(seed=5)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(4)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        coordinator = next(n for n in nodes if n.id == n.coordinator)
        plan = coordinator.book.current
        assert plan is not None
        victim = next(s.device for s in plan.stages if s.device != coordinator.id)
        before = coordinator.book.epoch

        preview = nodes[0].preview("planner", "throughput", [victim])
        assert victim not in {s.device for s in preview.stages}
        assert coordinator.book.epoch == before, "a preview applied something"
        with pytest.raises(PlanRefused, match="only the coordinator"):
            await next(n for n in nodes if n is not coordinator).apply("planner")
        with pytest.raises(PlanRefused, match="stays in"):
            nodes[0].preview("planner", None, [coordinator.id])

        applied = await coordinator.apply("planner", "throughput", [victim])
        assert applied.objective == "throughput" and "without" in applied.reason
        await until(lambda: all(n.book.current == applied for n in nodes), 10, "the new plan")
        # A member leaving makes the coordinator plan again: still without the excluded one.
        other = next(n for n in nodes if n.id not in (coordinator.id, victim))
        net.down.add(other.membership.me.addr)
        rest = [n for n in nodes if n is not other]
        await until(
            lambda: all(other.id not in {s.device for s in n.book.current.stages} for n in rest),  # type: ignore[union-attr]
            10,
            "a plan without the dead member",
        )
        current = coordinator.book.current
        assert current is not None and victim not in {s.device for s in current.stages}
        assert current.objective == "throughput"
        assert report.status(coordinator)["idle"][victim] == "excluded by the operator"
    finally:
        await stop(tg, nodes)


async def test_a_forged_member_at_a_real_members_address_is_declared_dead() -> None:
    """A key holder gossips a member that does not exist, at the address of one that does:
    that address answers in its own name, which does not vouch for the ghost."""
    net = SimNet(seed=11)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(4)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        real = nodes[1].membership.me
        ghost = Member(NodeId("ghost"), real.addr, real.incarnation, State.ALIVE)
        await nodes[0].handle(Ping(nodes[2].membership.me, (ghost,), None))
        assert nodes[0].membership.get(NodeId("ghost")) is not None

        def buried() -> bool:
            return all(
                (g := n.membership.get(NodeId("ghost"))) is None or not g.state.live for n in nodes
            )

        await until(buried, 15, "the ghost to be declared dead everywhere")
        await until(lambda: agreed(nodes), 20, "agreement without it")
    finally:
        await stop(tg, nodes)


async def test_a_forged_plan_at_the_edge_of_belief_is_outbid_by_the_coordinator() -> None:
    """A key holder puts the plan in force again under the largest term peers believe and
    another coordinator's name: a peer follows it, and the real coordinator's next plan, one
    term further, is believed a second later everywhere (not outbid by itself for ever)."""
    net = SimNet(seed=12)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(4)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        current = nodes[0].book.current
        assert current is not None
        forged = replace(current, epoch=Epoch(term_at(time.time() + FUTURE_SECONDS), "n00"))
        await nodes[0].handle(Ping(nodes[1].membership.me, (), forged))
        # Not "every peer holds it at once": once the clock passes a second the coordinator
        # outbids it, sometimes before gossip has carried it to every peer.
        assert forged.epoch in plans[nodes[0].id]
        await until(lambda: agreed(nodes), 10, "the coordinator's own plan again")
        assert all(n.book.epoch is not None and n.book.epoch > forged.epoch for n in nodes)
    finally:
        await stop(tg, nodes)


async def test_a_crash_the_data_plane_saw_is_confirmed_dead_within_a_round_trip() -> None:
    # Probing every 10 s, nobody would notice on their own for seconds: only the evidence
    # (a data link closed under a peer) makes it quick, and the confirming probes make it safe.
    slow = replace(TEST_TIMINGS, probe_interval=10.0, suspicion_timeout=30.0)
    net = SimNet(seed=3)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans, timings=slow) for i in range(4)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        victim, witness = nodes[1], nodes[0]
        vid = victim.id
        # A live peer's link failing is not a death: the confirming probe reaches it.
        witness.unreachable(victim.membership.me.addr)
        await asyncio.sleep(0.3)
        assert witness.membership.get(vid).state == State.ALIVE  # type: ignore[union-attr]
        net.closed.add(victim.membership.me.addr)  # its process crashed; its host refuses
        witness.unreachable(victim.membership.me.addr)
        took = await until(
            lambda: witness.membership.get(vid).state == State.DEAD,  # type: ignore[union-attr]
            5,
            "the crash confirmed",
        )
        assert took < 0.3

        def everyone_told() -> bool:
            views = [n.membership.get(vid) for n in nodes if n is not victim]
            return all(v is not None and v.state == State.DEAD for v in views)

        await until(everyone_told, 5, "every peer told")
    finally:
        await stop(tg, [n for n in nodes if n is not victim] + [victim])


async def test_the_data_plane_reads_a_links_measured_rate_by_address() -> None:
    """What paces a prompt's activations (chain/lanes.py): the rate either end measured."""
    net = SimNet(seed=3)
    plans: dict[NodeId, list[Epoch]] = {}
    nodes = [make_node(net, i, plans) for i in range(3)]
    tg = await start(net, nodes)
    try:
        await until(lambda: agreed(nodes), 20, "agreement")
        other = nodes[1].membership.me.addr
        await until(lambda: nodes[0].link_mbps(other) > 0, 20, "a measured link")
        assert nodes[0].link_mbps(other) == 1000.0  # what SimTransport measures
        assert nodes[0].link_mbps("10.9.9.9:7000") == 0.0  # no such member
    finally:
        await stop(tg, nodes)
