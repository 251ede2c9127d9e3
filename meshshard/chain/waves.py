"""When a stage should hold a decode batch for rows about to arrive. Pure: times are passed in.

Sessions decoding through a chain settle into waves: a stage runs whatever waits when its
last pass ends, so answers that started apart stay apart, and every wave pays for reading
all of the stage's weights. On a CPU a pass of 8 rows costs about 2x a pass of one
(SmolLM2-135M: 1 row 55 ms, 2 rows 67, 8 rows 111), so 8 answers in 4 waves spend twice
the compute of one wave of 8. A stage therefore holds a batch while a session it has seen
decoding is due within the time a pass takes: holding for it costs at most what a pass of
its own would, and waves that meet stay together (they arrive together ever after).

A session is due one interval (between its last two decode steps here) after its last, and
whenever a session of its last pass here is waiting: a wave's frames travel together, but a
rhythm read from the last round is wrong as soon as a pass's time changes (a prompt's slice
in it), and one frame of a wave arriving a moment before the others would otherwise start a
pass alone, the others then waiting for all of it.

One wave of every session leaves all stages but one idle: the wave is at one stage at a time.
Several waves, at most one a stage (`wave_rows`), keep more stages busy at once, the pipeline
of micro-batches the paper's throughput counts on, but each pass then has fewer rows, which
cost more a row. How many pays depends on every stage's costs: the coordinator plays the
choice out on its flow model when it makes a plan (planner/flow.py `waves_by`), for the
answers in flight its throughput is for and, where fewer waves are faster, for fewer (a host
whose passes of 2 rows cost less than one row's runs 2 answers fastest as one wave, and 8 as
two), the plan carries the counts, and a stage takes a wave's rows at most for the answers
decoding there, each wave held together up to its size.

Holding pays only where a pass of more rows costs less than passes of its rows apart (a CPU
or GPU reading its weights once for every row). On a device whose passes cost in proportion
to their rows it would only delay: waves there are better left spread round the chain, each
stage computing one while the others compute the rest (the paper's pipeline). So a stage
holds unless what it has measured of its passes says they cost in proportion.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from meshshard.model.batching import MAX_BATCH

K = TypeVar("K", bound=Hashable)  # what names a session: its id, or a number in a model

# A pass of a+b rows must cost under this share of a pass of a and a pass of b for holding
# to pay (a margin for the noise of measured costs).
PAYS = 0.9

Cost = Callable[[int], float | None]  # ms of a decode pass of n rows; None: not known


Waves = tuple[int, ...]  # by answers decoding (1, 2, ...), the last for any more (a plan's)


def waves_at(live: int, waves: Waves) -> int:
    """How many waves `live` decoding sessions spread over, by the plan's `waves`."""
    return waves[min(max(live, 1), len(waves)) - 1] if waves else 1


def wave_rows(live: int, waves: int | Waves) -> int:
    """Decode steps a stage takes into one pass, with `live` sessions spread over `waves` (a
    count, or counts by answers decoding)."""
    count = waves if isinstance(waves, int) else waves_at(live, waves)
    return max(1, min(MAX_BATCH, -(-live // max(1, count))))


def pays(cost: Cost, rows: int, more: int) -> bool:
    """Whether one pass of `rows` + `more` rows costs less than a pass of each; where any of
    the three is not known, it is taken to (every device measured so far batches well)."""
    together, apart = cost(rows + more), (cost(rows), cost(more))
    if together is None or apart[0] is None or apart[1] is None:
        return True
    return together < PAYS * (apart[0] + apart[1])


@dataclass(frozen=True)
class _Seen:
    at: float  # when its last decode step arrived
    interval: float | None  # since the decode step before it; None after a prompt
    # From the end of the pass that ran its step before here to this step's arrival: its
    # time at the other stages (None: not known). And when the pass of this step ended.
    away: float | None = None
    left: float | None = None


class Arrivals(Generic[K]):
    def __init__(self) -> None:
        self._seen: dict[K, _Seen] = {}
        self._wave: dict[K, int] = {}  # the decode pass each session was last in here
        self._prompting: set[K] = set()  # sessions whose last step here was not a decode step
        self._passes = 0

    def ran(self, decoding: Collection[K]) -> None:
        """A pass started with these sessions' decode steps."""
        self._passes += 1
        for session in decoding:
            self._wave[session] = self._passes

    def arrived(self, session: K, now: float, decode: bool) -> None:
        """A step of `session` arrived: a decode step (one new token, maybe a draft) or
        anything else (a prompt's chunk, a feed after a replay), after which its rhythm is
        unknown until two decode steps have come."""
        before = self._seen.get(session)
        if not decode:
            self._seen.pop(session, None)
            self._prompting.add(session)
            return
        self._prompting.discard(session)
        if before is None:
            self._seen[session] = _Seen(now, None)
        else:
            away = None if before.left is None else now - before.left
            self._seen[session] = _Seen(now, now - before.at, away)

    def away(self, sessions: Collection[K]) -> float | None:
        """The least time away from here of these sessions' last steps (None: one's is not
        known)."""
        aways = [seen.away if (seen := self._seen.get(s)) else None for s in sessions]
        return None if not aways or None in aways else min(a for a in aways if a is not None)

    def left(self, sessions: Collection[K], now: float) -> None:
        """A pass with these sessions' decode steps ended: their outputs go on."""
        for session in sessions:
            if (seen := self._seen.get(session)) is not None:
                self._seen[session] = replace(seen, left=now)

    def through(self, session: K) -> None:
        """The last rows of `session`'s prompt (or feed) went into a pass here: it decodes
        next."""
        self._prompting.discard(session)

    def decoding(self, live: Collection[K], waiting: Collection[K]) -> int:
        """How many of the `live` sessions ride in waves: all but those whose prompt (or a
        feed after a replay) is going through here. A prompt's session counted in would
        let one wave take the rows of two while it goes through, and the plan's waves, kept
        apart by `wave_rows`, would ride as one for as long as the prompt took. A prompt
        still `waiting` for its first pass here is not live yet and is kept in mind."""
        self._prompting &= set(live) | set(waiting)
        return sum(1 for session in live if session not in self._prompting)

    def hold(
        self,
        waiting: Collection[K],
        live: Collection[K],
        now: float,
        since: float,
        most: float,
        cost: Cost = lambda rows: None,
    ) -> float:
        """Seconds to keep holding a batch of the `waiting` sessions' steps, held since
        `since` (0: run it now): until `since + most`, while other `live` sessions are due
        by `since + most` (late ones count while overdue by less than their own interval,
        as in `next_due`) and one pass of them all costs less than passes apart (`cost`: ms
        of a pass by rows)."""
        for gone in [s for s in self._seen if s not in live]:
            del self._seen[gone]
        for gone in [s for s in self._wave if s not in live]:
            del self._wave[gone]
        left = since + most - now
        if left <= 0:
            return 0.0
        due = {
            session
            for session, (at, every) in self._dues(waiting, live).items()
            if since - every <= at <= since + most
        }
        waves = {self._wave.get(session) for session in waiting} - {None}
        due |= {s for s, w in self._wave.items() if w in waves and s not in waiting}
        return left if due and pays(cost, len(waiting), len(due)) else 0.0

    def next_due(self, waiting: Collection[K], live: Collection[K], now: float) -> float | None:
        """When the next decode step of a `live` session not `waiting` is due: the earliest,
        counting one overdue by less than its own interval (it is late, not gone: a pass
        that slowed down, with a prompt's slice in it say, slows its rhythm); None if none
        is. Where its last step's time away from here is known, it is due that long after
        that step's pass here ended: a prompt's slices lengthen this stage's passes, and a
        rhythm read from the round before then put the step's return a pass too early, its
        lateness taken for an answer gone and a pass of the prompt alone started just
        before the step came back (a 2-peer mesh's last stage, docs/data-plane.md)."""
        dues = self._dues(waiting, live)
        for session, (_, every) in dues.items():
            seen = self._seen[session]
            if seen.left is not None and seen.away is not None:
                dues[session] = (seen.left + seen.away, every)
        return min((at for at, every in dues.values() if at + every >= now), default=None)

    def _dues(self, waiting: Collection[K], live: Collection[K]) -> dict[K, tuple[float, float]]:
        """When each `live` session not `waiting` whose rhythm is known is due, and its
        interval."""
        return {
            session: (seen.at + seen.interval, seen.interval)
            for session, seen in self._seen.items()
            if session not in waiting and session in live and seen.interval is not None
        }
