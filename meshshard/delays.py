"""Test-only link delay for the namespace testbed, whose kernel has no netem.

`MESHSHARD_TEST_DELAYS="self=5,10.232.7.2=0.5,..."` gives this peer's one-way delay to the
bridge and every other host's, in milliseconds. A message then waits the sender's delay plus
the receiver's before it is sent, in order and without holding up the messages behind it or
its sender, so a link behaves like one with that latency. A host not in the table (this peer
itself) is reached without a link, so without delay. Unset (real use), nothing waits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV = "MESHSHARD_TEST_DELAYS"


@dataclass(frozen=True)
class Delays:
    own_ms: float = 0.0
    hosts_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Delays:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return cls()
        table = {}
        for item in text.split(","):
            host, _, ms = item.partition("=")
            table[host.strip()] = float(ms)
        own = table.pop("self", 0.0)
        return cls(own, table)

    def to(self, addr: str | None) -> float:
        """Seconds a message to `addr` (host or host:port) waits before it leaves."""
        if not self.own_ms and not self.hosts_ms:
            return 0.0
        host = (addr or "").rsplit(":", 1)[0]
        if host not in self.hosts_ms:
            return 0.0
        return (self.own_ms + self.hosts_ms[host]) / 1000


NONE = Delays()
