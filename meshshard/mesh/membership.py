"""SWIM membership as a pure state machine: no sockets, no clock of its own.

The driver feeds it what happened (a probe answered or not, gossip received, time passing)
and asks it what to do next (whom to probe, whom to ask for help, what to piggyback).
Precedence follows SWIM: an update wins when (incarnation, severity) is higher, so a peer
refutes a suspicion about itself by raising its incarnation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from meshshard.config import Timings
from meshshard.types import Epoch, Member, NodeId, State

_SEVERITY = {State.ALIVE: 0, State.SUSPECT: 1, State.DEAD: 2, State.LEFT: 2}
MAX_HEALTH = 8  # Lifeguard's bound on the local health score
CONFIRMATIONS = 3  # independent accusers after the first that bring a suspicion to its floor


@dataclass(frozen=True)
class Change:
    """A member's state changed in our view (for logs, events, and replanning)."""

    member: Member
    old: State | None  # None: newly learned

    def __str__(self) -> str:
        old = self.old.value if self.old else "unknown"
        return (
            f"{self.member.id} {old} -> {self.member.state.value} (inc {self.member.incarnation})"
        )


class Membership:
    def __init__(self, me: Member, timings: Timings, now: float, rng: random.Random) -> None:
        self._me_id = me.id
        self._timings = timings
        self._rng = rng
        self._members: dict[NodeId, Member] = {me.id: me}
        self._since: dict[NodeId, float] = {me.id: now}  # when the current state began
        self._queue: dict[NodeId, int] = {}  # id -> transmissions left for its latest record
        self._probe_order: list[NodeId] = []
        self._accusers: dict[NodeId, set[NodeId]] = {}  # of each suspect, as we heard them
        self.version = 0  # counts changes to any record we hold
        # Lifeguard's local health: 0 when we keep up; higher when we seem to be the slow
        # one (our probes unanswered even by helpers, suspicions of us to refute). Our probe
        # and suspicion timeouts stretch by (1 + health), so a peer that is itself starved
        # does not declare others dead for its own slowness.
        self.health = 0
        self._enqueue(me.id)

    @property
    def me(self) -> Member:
        return self._members[self._me_id]  # never forgotten: tick() skips us

    def get(self, node: NodeId) -> Member | None:
        return self._members.get(node)

    def members(self) -> list[Member]:
        """Everyone we know, tombstones included, sorted by id."""
        return [self._members[k] for k in sorted(self._members)]

    def live(self) -> list[Member]:
        return [m for m in self.members() if m.state.live]

    def others(self) -> list[Member]:
        return [m for m in self.live() if m.id != self._me_id]

    def apply(self, update: Member, now: float) -> Change | None:
        """Merge one gossiped record; returns the change, if our view changed."""
        if update.id == self._me_id:
            return self._refute(update)
        current = self._members.get(update.id)
        if current is not None and self._confirms(update, current):
            return None
        if current is not None and not _wins(update, current):
            return None
        self._members[update.id] = update
        self.version += 1
        if current is None or current.state != update.state:
            self._since[update.id] = now
            self._accusers.pop(update.id, None)
            if update.state == State.SUSPECT and update.accuser is not None:
                self._accusers[update.id] = {update.accuser}
        self._enqueue(update.id)
        if current is not None and current.state == update.state:
            return None  # same state, newer details (profile version, address)
        return Change(update, current.state if current else None)

    def apply_all(self, updates: list[Member], now: float) -> list[Change]:
        return [c for u in updates if (c := self.apply(u, now)) is not None]

    def update_me(
        self,
        *,
        incarnation: int | None = None,
        state: State | None = None,
        profile_version: int | None = None,
        ready: Epoch | None = None,
        draining: bool | None = None,
    ) -> Member:
        """Change our own record and gossip it."""
        me = self.me
        me = replace(
            me,
            incarnation=me.incarnation if incarnation is None else incarnation,
            state=me.state if state is None else state,
            profile_version=me.profile_version if profile_version is None else profile_version,
            ready=me.ready if ready is None else ready,
            draining=me.draining if draining is None else draining,
        )
        self._members[me.id] = me
        self.version += 1
        self._enqueue(me.id)
        return me

    def drain(self) -> Member:
        """Announce that we are about to leave: plans move off us while we still serve."""
        return self.update_me(draining=True, incarnation=self.me.incarnation + 1)

    def leave(self) -> Member:
        """Announce a clean leave: our record as LEFT with a higher incarnation."""
        return self.update_me(state=State.LEFT, incarnation=self.me.incarnation + 1)

    def next_probe_target(self) -> Member | None:
        """Round-robin over live members in a random order, reshuffled each round (SWIM)."""
        live = {m.id for m in self.others()}
        while self._probe_order:
            node = self._probe_order.pop()
            if node in live:
                return self._members[node]
        if not live:
            return None
        self._probe_order = sorted(live)
        self._rng.shuffle(self._probe_order)
        return self._members[self._probe_order.pop()]

    def helpers(self, target: NodeId) -> list[Member]:
        """Members to ask for an indirect probe of `target`."""
        pool = [m for m in self.others() if m.id != target and m.state == State.ALIVE]
        return self._rng.sample(pool, min(self._timings.indirect_probes, len(pool)))

    def probe_answered(self) -> None:
        """A probe of ours was answered in time: we keep up."""
        self.health = max(0, self.health - 1)

    def missed_nacks(self, count: int) -> None:
        """Helpers we asked for an indirect probe did not answer at all, not even to say they
        could not reach the target: the slow one may be us."""
        self.health = min(MAX_HEALTH, self.health + count)

    def scaled(self, seconds: float) -> float:
        """A timeout of ours, stretched by our local health."""
        return seconds * (1 + self.health)

    def probe_failed(self, target: NodeId, now: float, refused: bool = False) -> Change | None:
        """Neither we nor the helpers reached `target`: suspect it; or, where its host
        refused us (`refused`: nothing listens where it did, as a crashed process leaves
        it), declare it dead at once, as SWIM's confirm does."""
        member = self._members.get(target)
        if member is None or not member.state.live:
            return None
        if refused:
            return self.apply(replace(member, state=State.DEAD, accuser=None), now)
        # A suspect already: our failed probe is one more independent confirmation.
        return self.apply(replace(member, state=State.SUSPECT, accuser=self._me_id), now)

    def suspicion_timeout(self, node: NodeId) -> float:
        """How long `node`'s suspicion lasts: from the lone timeout down to the confirmed one
        as independent accusers join (Lifeguard's formula; log-shaped, so the first
        confirmations count most), stretched by our local health."""
        t = self._timings
        live = sum(1 for m in self._members.values() if m.state.live)
        expected = min(CONFIRMATIONS, live - 2)  # neither we nor the suspect confirm
        confirmations = max(0, len(self._accusers.get(node, ())) - 1)
        if expected < 1 or confirmations == 0:
            return self.scaled(t.suspicion_timeout)
        share = math.log(min(confirmations, expected) + 1) / math.log(expected + 1)
        span = t.suspicion_timeout - t.suspicion_confirmed
        return self.scaled(t.suspicion_timeout - span * share)

    def tick(self, now: float, heard: Mapping[NodeId, float] | None = None) -> list[Change]:
        """Time passes: suspects past their timeout die; old tombstones are forgotten.
        `heard`: when the data plane last had a frame from a member; a suspect whose
        frames keep arriving is alive, whatever its probes say, so its timeout counts from
        its last frame."""
        heard = heard or {}
        changes = []
        for node, member in list(self._members.items()):
            if node == self._me_id:
                continue
            age = now - max(self._since[node], heard.get(node, -math.inf))
            if member.state == State.SUSPECT and age >= self.suspicion_timeout(node):
                change = self.apply(replace(member, state=State.DEAD, accuser=None), now)
                if change:
                    changes.append(change)
            elif not member.state.live and age >= self._timings.tombstone_ttl:
                del self._members[node]
                self.version += 1
                del self._since[node]
                self._queue.pop(node, None)
        return changes

    def piggyback(self, to: NodeId | None = None) -> list[Member]:
        """Updates for the next message: least-sent first, each sent a bounded number of times.
        A message `to` a member we suspect carries that suspicion first, whether or not it is
        still queued (Lifeguard's buddy system): the suspect learns of it at once and can
        refute it."""
        chosen = sorted(self._queue, key=lambda n: (-self._queue[n], n))[
            : self._timings.max_piggyback
        ]
        target = self._members.get(to) if to is not None else None
        buddy = [target] if target is not None and target.state == State.SUSPECT else []
        if buddy and to in chosen:
            chosen.remove(to)
            self._queue[to] -= 1
            if self._queue[to] <= 0:
                del self._queue[to]
        out = list(buddy)
        for node in chosen:
            if node in self._members:
                out.append(self._members[node])
            self._queue[node] -= 1
            if self._queue[node] <= 0:
                del self._queue[node]
        return out

    def _confirms(self, update: Member, current: Member) -> bool:
        """`update` is another member's suspicion of the same incarnation we already suspect:
        count its accuser, and pass it on if it is new to us, so the others count it too."""
        same = (update.incarnation, update.state) == (current.incarnation, current.state)
        if not same or update.state != State.SUSPECT or update.accuser is None:
            return False
        accusers = self._accusers.setdefault(update.id, set())
        if update.accuser not in accusers:
            accusers.add(update.accuser)
            newer = _wins(update, current)  # it may carry newer details too
            self._members[update.id] = update if newer else replace(current, accuser=update.accuser)
            self.version += 1
            self._enqueue(update.id)
        return True

    def _refute(self, update: Member) -> Change | None:
        """A record of us that others could take over ours (a suspicion, or anything forged:
        other details, a higher incarnation) is outbid with a higher incarnation."""
        me = self.me
        if update.incarnation < me.incarnation or me.state == State.LEFT:
            return None  # old news; or we are leaving: let it stand
        forged = (update.addr, update.priority) != (me.addr, me.priority)
        if update.state != State.ALIVE or forged or _wins(update, me):
            if update.state == State.SUSPECT:
                self.health = min(MAX_HEALTH, self.health + 1)  # others find us slow
            self.update_me(incarnation=update.incarnation + 1)
        return None

    def _enqueue(self, node: NodeId) -> None:
        n = sum(1 for m in self._members.values() if m.state.live)
        self._queue[node] = self._timings.retransmit_mult * max(1, math.ceil(math.log2(n + 1)))


def _wins(update: Member, current: Member) -> bool:
    new = (update.incarnation, _SEVERITY[update.state])
    old = (current.incarnation, _SEVERITY[current.state])
    if new != old:
        return new > old
    # Same incarnation and state: newer details (a member only moves these forward).
    new_details = (update.profile_version, update.ready, update.draining)
    return new_details > (current.profile_version, current.ready, current.draining)
