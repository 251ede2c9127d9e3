"""The share of this machine's CPU time its hypervisor gave to others (Linux's `steal`).

On a virtual machine a vCPU can wait while the host runs another guest; a pass then takes
longer on the wall clock than on its thread's CPU clock, and a benchmark's tokens/s moves
with neighbours it cannot see. The benchmarks print this beside their ratios, so a run's
slow minute shows as what it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

STAT = Path("/proc/stat")


def ticks() -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU since boot; None where the kernel does not say."""
    try:
        fields = STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    counts = [int(f) for f in fields[1:9]]
    return counts[7], sum(counts)


class Stolen:
    """Steal summed over the spans it watched: `with stolen.watch(): ...`, then `share`."""

    def __init__(self) -> None:
        self.steal = self.total = 0

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        before = ticks()
        try:
            yield
        finally:
            after = ticks()
            if before is not None and after is not None:
                self.steal += after[0] - before[0]
                self.total += after[1] - before[1]

    @property
    def share(self) -> float | None:
        """Stolen ticks over all ticks watched; None where none were counted."""
        return self.steal / self.total if self.total else None

    def __str__(self) -> str:
        return self.percent(self.share)

    @staticmethod
    def percent(share: float | None) -> str:
        return "n/a" if share is None else f"{100 * share:.1f}%"
