"""Link estimates, pure: the median of the last probes, and when a change is worth gossip."""

from __future__ import annotations

from meshshard.mesh.coordinator import mesh_instance
from meshshard.mesh.estimates import SAMPLES, LinkEstimates, material
from meshshard.planner.instance import parse_instance
from meshshard.types import LinkStat, Member, NodeId, Profile, State, UnitCost
from meshshard.wire import Sync, decode, encode
from meshshard.wire.checks import MAX_MBPS, MAX_MS, MIN_MBPS

A, B = NodeId("a"), NodeId("b")


def test_a_link_is_the_median_of_its_recent_probes_and_one_outlier_does_not_count() -> None:
    links = LinkEstimates()
    # One probe met a busy peer, one an idle burst far above what the link carries.
    for mbps, rtt in [(900, 0.4), (120, 11.0), (850, 0.5), (2.1e6, 0.45), (880, 0.42)]:
        links.add(A, LinkStat(mbps, rtt))
    assert links.best() == {A: LinkStat(880, 0.45)}
    for _ in range(SAMPLES):  # the link really got slower: old samples age out
        links.add(A, LinkStat(10, 5.0))
    assert links.best() == {A: LinkStat(10, 5.0)}
    links.add(B, LinkStat(100, 1.0))
    links.keep([B])
    assert links.best() == {B: LinkStat(100, 1.0)}


def test_only_a_material_change_is_published() -> None:
    old = {A: LinkStat(100, 1.0)}
    assert not material(old, {A: LinkStat(120, 1.2)})
    assert material(old, {A: LinkStat(140, 1.0)})
    assert material(old, {A: LinkStat(100, 1.5)})
    assert material(old, {A: LinkStat(100, 1.0), B: LinkStat(100, 1.0)})


def test_an_impossible_measurement_is_held_to_what_the_wire_carries() -> None:
    # On loopback a timed transfer can read over a Tbit/s. A profile carrying that was
    # refused whole by every peer, and with it every push/pull of ours (found by
    # tools/bench_churn.py: plans then spread only on probes, hundreds of ms late).
    links = LinkEstimates()
    links.add(A, LinkStat(2.4e6, -0.01))
    links.add(B, LinkStat(0.0, 1e9))
    me = Member(NodeId("me"), "127.0.0.1:7000", 1, State.ALIVE, 0)
    profile = Profile(NodeId("me"), 1, "m", 1e9, (1.0,), measured=True, links=links.best())
    sync = decode(encode(Sync(me, (me,), (profile,), None)))
    assert isinstance(sync, Sync)
    assert sync.profiles[0].links == {A: LinkStat(MAX_MBPS, 0.0), B: LinkStat(MIN_MBPS, MAX_MS)}


def test_each_direction_of_a_link_is_planned_with_its_own_rate() -> None:
    """A member's estimate of another is what it moved from that member: a's 5 Mbit/s to b
    is b's uplink (b -> a), b's 500 Mbit/s to a is a's uplink (a -> b)."""
    members = [Member(n, f"127.0.0.1:{7000 + i}", 1, State.ALIVE, 0) for i, n in enumerate((A, B))]
    units = [UnitCost(f"U{i}", 1_000_000, 0, 400_000) for i in range(2)]
    profiles = {
        A: Profile(A, 1, "m", 1e9, (1.0, 1.0), True, links={B: LinkStat(5.0, 2.0)}),
        B: Profile(B, 1, "m", 1e9, (1.0, 1.0), True, links={A: LinkStat(500.0, 4.0)}),
    }
    inst = mesh_instance(members, profiles, units, "m", A, 0)
    assert inst.link(A, B).mbps == 500.0 and inst.link(B, A).mbps == 5.0
    assert inst.link(A, B).ms == inst.link(B, A).ms == 1.5  # half the mean round trip
    assert inst.hop_ms(A, B, 4e5) < inst.hop_ms(B, A, 4e5)
    assert parse_instance(inst.to_json()) == inst  # the instance file keeps the directions
