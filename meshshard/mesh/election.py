"""Who coordinates, and which plan stands: the bully rule and epoch fencing, both pure."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from meshshard.mesh.sanity import term_at
from meshshard.types import Epoch, Member, NodeId, PlanRecord

HISTORY = 32  # plans remembered for `meshshard status`


def elect(members: Iterable[Member]) -> NodeId | None:
    """The serving member with the highest (priority, id); suspects still count, so a
    passing suspicion does not move the coordinator, and a draining member does not."""
    live = [m for m in members if m.serving]
    if not live:
        return None
    return max(live, key=lambda m: (m.priority, m.id)).id


class PlanBook:
    """The plan this peer follows. Only a newer epoch replaces it; older ones are refused."""

    def __init__(self) -> None:
        self.current: PlanRecord | None = None
        self.max_term = 0
        self.history: deque[PlanRecord] = deque(maxlen=HISTORY)

    @property
    def epoch(self) -> Epoch | None:
        return self.current.epoch if self.current else None

    def observe(self, epoch: Epoch) -> None:
        self.max_term = max(self.max_term, epoch.term)

    def next_epoch(self, coordinator: NodeId, wall: float) -> Epoch:
        """A fresh epoch: its term beats every term seen, so it beats every epoch seen, and
        is at least the clock's (so no term accepted as plausible stays out of reach). The
        term is taken only when its plan is adopted: a plan refused (one term past what
        peers believe, after a forged term at their limit) is not outbid by the next, which
        would run ahead of the clock for ever."""
        return Epoch(max(self.max_term + 1, term_at(wall)), coordinator)

    def offer(self, plan: PlanRecord) -> bool:
        """Adopt `plan` if it is newer than ours; returns whether it was adopted."""
        self.observe(plan.epoch)
        if self.current is not None and plan.epoch <= self.current.epoch:
            return False
        self.current = plan
        self.history.append(plan)
        return True

    def admits(self, epoch: Epoch) -> bool:
        """Fencing for work stamped with `epoch`: nothing older than the plan we follow."""
        return self.current is None or epoch >= self.current.epoch
