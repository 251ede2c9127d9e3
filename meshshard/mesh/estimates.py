"""Link estimates, pure: what a peer believes of its link to each member from its probes.

Each link's estimate is the median of its last SAMPLES probes, rate and round trip each: one
probe that met a busy end (loading, profiling, serving) or an idle burst does not move it, as
it moved the best-of-five this replaced (which kept single transfers of over 2 Tbit/s on a
1 Gbit/s link). The estimates are published (in the profile) only when they change enough to
matter, so gossip stays quiet."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from meshshard.types import LinkStat, NodeId
from meshshard.wire.checks import MAX_MBPS, MAX_MS, MIN_MBPS

SAMPLES = 5  # probes per link that its estimate is the best of
CHANGE = 0.3  # a change this large (relative) is worth publishing


class LinkEstimates:
    def __init__(self) -> None:
        self._samples: dict[NodeId, deque[LinkStat]] = {}

    def add(self, member: NodeId, stat: LinkStat) -> None:
        """One probe's measurement, held to what the wire carries: on loopback a timed
        transfer can read over a Tbit/s, and a profile with that in it would be refused."""
        mbps = min(max(stat.mbps, MIN_MBPS), MAX_MBPS)
        rtt = min(max(stat.rtt_ms, 0.0), MAX_MS)
        self._samples.setdefault(member, deque(maxlen=SAMPLES)).append(LinkStat(mbps, rtt))

    def keep(self, live: Iterable[NodeId]) -> None:
        """Forget the links to members no longer live."""
        for gone in self._samples.keys() - set(live):
            del self._samples[gone]

    def best(self) -> dict[NodeId, LinkStat]:
        return {
            peer: LinkStat(
                mbps=statistics.median(s.mbps for s in recent),
                rtt_ms=statistics.median(s.rtt_ms for s in recent),
            )
            for peer, recent in self._samples.items()
        }


def material(old: dict[NodeId, LinkStat], new: dict[NodeId, LinkStat]) -> bool:
    """Links changed enough to matter: a member added or gone, or a 30% change."""
    if old.keys() != new.keys():
        return True
    return any(
        abs(new[k].mbps - old[k].mbps) > CHANGE * old[k].mbps
        or abs(new[k].rtt_ms - old[k].rtt_ms) > CHANGE * old[k].rtt_ms + 0.05
        for k in new
    )
