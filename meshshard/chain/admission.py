"""Admission control of one stage, pure: sessions reserve the KV cache they may grow to, and
a new one is refused (the origin answers 429) when the stage's memory cannot hold it, so a
peer never runs out of memory however many answers are asked of it at once."""

from __future__ import annotations


class KVBudget:
    """Tokens of KV cache a stage can hold beside its weights, and what sessions reserved.

    A session reserves, on its first frame, the positions it may reach (prompt and the most
    tokens it may generate). A session met later (moved here by a plan change, or replayed)
    was admitted by the chain before: it is taken even past the budget, as the plan's own
    memory check allows for one session of the planned context."""

    def __init__(self, tokens: int | None) -> None:
        self.tokens = tokens  # None: this stage keeps no KV cache (embedding or head only)
        self._held: dict[str, int] = {}

    @classmethod
    def of_stage(cls, memory: float, weight_bytes: int, kv_bytes_per_token: int) -> KVBudget:
        if kv_bytes_per_token == 0:
            return cls(None)
        return cls(max(0, int((memory - weight_bytes) // kv_bytes_per_token)))

    @property
    def reserved(self) -> int:
        return sum(self._held.values())

    @property
    def sessions(self) -> int:
        return len(self._held)

    def held(self, session: str) -> int:
        """The positions `session` reserved (0: none)."""
        return self._held.get(session, 0)

    def admit(self, session: str, positions: int, new: bool) -> bool:
        """Whether `session` may go on with `positions` reserved; a new session is refused
        (and nothing reserved) when the budget cannot hold it."""
        held = self._held.get(session, 0)
        if positions <= held:
            return True
        more = positions - held
        if new and held == 0 and self.tokens is not None and self.reserved + more > self.tokens:
            return False
        self._held[session] = positions
        return True

    def release(self, session: str) -> None:
        self._held.pop(session, None)

    def carry(self, other: KVBudget) -> KVBudget:
        """This budget holding `other`'s reservations (a stage replaced by its next)."""
        for session, positions in other._held.items():
            self._held[session] = max(positions, self._held.get(session, 0))
        return self
