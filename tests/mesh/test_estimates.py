"""Link estimates, pure: the best of the last probes, and when a change is worth gossip."""

from __future__ import annotations

from meshshard.mesh.estimates import SAMPLES, LinkEstimates, material
from meshshard.types import LinkStat, NodeId

A, B = NodeId("a"), NodeId("b")


def test_a_link_is_its_best_recent_probe_and_busy_answers_do_not_count() -> None:
    links = LinkEstimates()
    for mbps, rtt in [(900, 0.4), (120, 11.0), (850, 0.5)]:  # one probe met a busy peer
        links.add(A, LinkStat(mbps, rtt))
    assert links.best() == {A: LinkStat(900, 0.4)}
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
