"""Addresses to introduce ourselves to that are not members yet, pure: seeds given by hand
(`--peer`) and addresses discovery found.

Each address is tried at once, then after waits that double; a found one that fails TRIES
times in a row is forgotten (and not tried again for GIVEN_UP_SECONDS, however often
discovery reports it), and a seed given by hand is kept (it may start later than us)
but tried at most every MAX_WAIT seconds. An address that answered is kept too, and tried
again every MAX_WAIT seconds while it is not a live member: after a partition, that is how
the two sides find each other again. At most LIMIT found addresses are kept, so a LAN host
announcing thousands of bogus records costs a bounded number of tries, and those tries run
beside gossip with members, never in its way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

FIRST_WAIT = 1.0  # seconds after the first failed try
MAX_WAIT = 30.0
TRIES = 3  # failed tries in a row before a found address is forgotten
LIMIT = 64  # found addresses kept at once
GIVEN_UP_SECONDS = 600.0  # a forgotten address found again in this time is not tried again
GIVEN_UP_LIMIT = 4096


@dataclass
class _Seed:
    configured: bool
    failures: int = 0
    next_try: float = 0.0
    answered: bool = False


class Seeds:
    def __init__(self) -> None:
        self._seeds: dict[str, _Seed] = {}
        self._given_up: OrderedDict[str, float] = OrderedDict()  # address -> when
        self.tries = 0  # introductions attempted, answered or not

    def waiting(self, members: Container[str]) -> int:
        """Addresses still to be tried: not answered yet, and not members meanwhile."""
        return sum(1 for a, s in self._seeds.items() if not s.answered and a not in members)

    def __len__(self) -> int:
        return len(self._seeds)

    def __contains__(self, addr: object) -> bool:
        return addr in self._seeds

    def add(self, addr: str, now: float, configured: bool = False) -> bool:
        """Remember `addr` (to try at once if it is new); False when it was known, or when
        LIMIT found addresses are already waiting."""
        seed = self._seeds.get(addr)
        if seed is not None:
            seed.configured |= configured
            return False
        given_up = self._given_up.get(addr)
        if not configured and given_up is not None and now - given_up < GIVEN_UP_SECONDS:
            return False
        found = sum(1 for s in self._seeds.values() if not s.configured)
        if not configured and found >= LIMIT:
            return False
        self._seeds[addr] = _Seed(configured, next_try=now)
        return True

    def due(self, now: float, members: Container[str]) -> str | None:
        """The address to try now (the longest waiting), skipping members' addresses."""
        ready = [
            (s.next_try, a)
            for a, s in self._seeds.items()
            if s.next_try <= now and a not in members
        ]
        if not ready:
            return None
        self.tries += 1
        return min(ready)[1]

    def next_try(self, members: Container[str]) -> float | None:
        times = [s.next_try for a, s in self._seeds.items() if a not in members]
        return min(times) if times else None

    def answered(self, addr: str, now: float) -> None:
        """It answered (it is a member now): looked at again only if it stops being one."""
        seed = self._seeds.get(addr)
        if seed is not None:
            seed.failures, seed.next_try, seed.answered = 0, now + MAX_WAIT, True

    def failed(self, addr: str, now: float) -> None:
        seed = self._seeds.get(addr)
        if seed is None:
            return
        seed.failures += 1
        if not seed.configured and seed.failures >= TRIES:
            del self._seeds[addr]
            self._given_up[addr] = now
            self._given_up.move_to_end(addr)
            while len(self._given_up) > GIVEN_UP_LIMIT:
                self._given_up.popitem(last=False)
            return
        seed.next_try = now + min(FIRST_WAIT * 2 ** (seed.failures - 1), MAX_WAIT)
