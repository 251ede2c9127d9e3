"""KV handoff: which cached units change owner between two plans, and the caches a peer keeps
for units it no longer runs until their new owners have asked for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshshard.model.kvcache import KVCache
from meshshard.types import NodeId, PlanRecord


@dataclass(frozen=True)
class Move:
    """Units [start, end) of a session's cache go from one peer to another."""

    source: NodeId
    target: NodeId
    start: int
    end: int


def moves(old: PlanRecord, new: PlanRecord, num_units: int) -> list[Move]:
    """The decoder-layer units (the only ones with a cache) whose owner differs between the
    plans, as maximal runs with the same old and new owner."""
    out: list[Move] = []
    for unit in range(1, num_units - 1):
        source, target = _owner(old, unit), _owner(new, unit)
        if source is None or target is None or source == target:
            continue
        last = out[-1] if out else None
        if last is not None and (last.source, last.target, last.end) == (source, target, unit):
            out[-1] = Move(source, target, last.start, unit + 1)
        else:
            out.append(Move(source, target, unit, unit + 1))
    return out


class LeftBehind:
    """Caches of sessions for layers this peer ran under an earlier plan, kept `keep` seconds
    so their new owners can have them."""

    def __init__(self, keep: float, now: Callable[[], float]) -> None:
        self._keep, self._now = keep, now
        self._caches: dict[str, tuple[float, KVCache]] = {}

    def __len__(self) -> int:
        return len(self._caches)

    def add(self, caches: dict[str, KVCache]) -> None:
        until = self._now() + self._keep
        for session, cache in caches.items():
            held = self._caches.get(session)
            if held is not None:  # older leftovers of the same session: merge
                cache = _merged(held[1], cache)
            self._caches[session] = (until, cache)

    def get(self, session: str) -> KVCache | None:
        held = self._caches.get(session)
        return held[1] if held is not None else None

    def drop(self, session: str) -> None:
        self._caches.pop(session, None)

    def expire(self) -> list[str]:
        now = self._now()
        gone = [s for s, (until, _) in self._caches.items() if until <= now]
        for session in gone:
            del self._caches[session]
        return gone

    def sessions(self) -> list[str]:
        return list(self._caches)

    def nbytes(self) -> int:
        return sum(cache.nbytes() for _, cache in self._caches.values())


def _owner(plan: PlanRecord, unit: int) -> NodeId | None:
    return next((s.device for s in plan.stages if s.start <= unit < s.end), None)


def _merged(old: KVCache, new: KVCache) -> KVCache:
    """`new` plus the layers only `old` has."""
    extra = old.split(i for i in old.layers if i not in new.layers and old.has(i))
    merged = KVCache((*new.layers, *extra.layers))
    merged.reserve(max(new.reserved, old.reserved))
    for cache in (new, extra):
        for layer in cache.layers:
            if cache.has(layer):
                merged.put(layer, *cache.layer(layer))
    return merged
