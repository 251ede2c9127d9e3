"""The steps waiting at a stage, and which of them its next forward pass runs.

Decoding comes first: waiting decode steps run as one batch, with at most one slice of a
prompt inside it (chunked prefill mixed with decoding, as in Sarathi-Serve: the pass packs
every session's positions without padding, so the slice costs its own rows and the weights
are read once for both). A slice is cut to cost about one more decode batch (half of one
deep in a long prompt), so an answer that is decoding waits for at most that much more per
stage while a long prompt goes through; where the steps are away long enough for a pass of
the long prompt alone, it goes then instead, and their pass stays a decode pass. Batches are
sized by the passes' measured costs (passes.py) and the rhythm decode steps arrive in
(waves.py).

No I/O and no clock of its own: the stage hands it frames and the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Protocol

from meshshard.chain.passes import MIN_BESIDE, PassCosts, one_token
from meshshard.chain.tensors import joined, rows
from meshshard.chain.waves import Arrivals, Waves, wave_rows
from meshshard.model.batching import MAX_BATCH
from meshshard.wire import StepFrame

MIN_SLICE = 16  # prompt rows a pass of prompts alone holds at least: fewer waste its weights
# Past this many positions a prompt is a long one (a document, not a chat turn): its slices
# beside decode steps cost LONG_SHARE of a decode pass, so answers it holds up for seconds keep
# within 3x their usual gap though a pass runs long (lan-3: 8 and then 9 prompt rows beside
# two steps in 126 and 223 ms, testbed.md). Shorter prompts take a whole pass's worth, so
# answers asked together start together: at half, 16 asked at once on lan-3 were never all
# decoding at the same time (run 22). A long one is long from its first slice: whole passes'
# worth of its first positions held a 2-peer mesh's answers 3-4x their gap (data-plane.md).
LONG_PROMPT = 256
LONG_SHARE = 0.5


def _deep(prompt: StepFrame) -> bool:
    """Whether the prompt reaches past LONG_PROMPT (from its first slice, where its frames
    say where it ends)."""
    return max(prompt.start + prompt.tensor.shape[0], prompt.ends) > LONG_PROMPT


class Cached(Protocol):
    """What the schedule reads of its stage's shard (model/shard.py)."""

    layer_ids: tuple[int, ...]  # none: the shard keeps no cache (an embedding, a head)

    @property
    def sessions(self) -> list[str]: ...

    def cache_length(self, session: str) -> int: ...


def fitted(batch: list[StepFrame]) -> list[StepFrame]:
    """The batch with drafts cut so that its pass runs no more positions than a full batch
    of single steps (MAX_BATCH): one long draft must not multiply what the others wait for.
    Cutting a draft is safe: the last stage confirms what is left of it, and whoever
    drafted it drafts less next time."""
    most = MAX_BATCH // len(batch) - 1
    return [
        replace(f, tensor=rows(f.tensor, 0, 1 + most), draft=f.draft[:most])
        if len(f.draft) > most
        else f
        for f in batch
    ]


class Schedule:
    def __init__(self, shard: Cached, costs: PassCosts, waves: Waves = (1,)) -> None:
        self.shard = shard
        self.costs = costs
        self.waves = waves  # the chain's decoding sessions spread over, by their count (the plan's)
        self.queue: deque[StepFrame] = deque()
        self._arrivals = Arrivals[str]()
        self._holding_since: float | None = None
        self.holds = 0  # batches held for rows due soon

    def add(self, frame: StepFrame, now: float) -> None:
        self._arrivals.arrived(frame.session, now, one_token(frame))
        if not self._joined(frame):
            self.queue.append(frame)

    def take(self, now: float) -> list[StepFrame] | float:
        """The waiting decode steps (a token, and maybe a draft to verify) of up to a wave's
        sessions (waves.wave_rows), and with them other steps (prompts, feeds after a
        replay): whole short prompts of several sessions together, else a slice of the
        oldest. Only a session's oldest waiting frame may go. Or seconds to wait: to hold the
        decode steps for others due soon (waves.py), or a prompt for decode steps due before
        a pass of it would end."""
        decodes: list[StepFrame] = []
        others: list[StepFrame] = []
        seen: set[str] = set()
        for frame in self.queue:
            if frame.session in seen:
                continue
            seen.add(frame.session)
            (decodes if self.decodable(frame) else others).append(frame)
        wave = wave_rows(self._arrivals.decoding(self.shard.sessions, seen), self.waves)
        del decodes[wave:]
        if (stray := next((f for f in others if not self.continues(f)), None)) is not None:
            # Alone: its pass meets the miss and says so (unknown session, or where the
            # stage's cache ends); in a packed pass it would start afresh at position 0.
            self.queue.remove(stray)
            return [stray]
        if decodes and len(decodes) < wave and (hold := self._hold(seen, now)):
            return hold
        self._holding_since = None
        prompts: list[StepFrame] = []
        if others and not (decodes and self._apart(decodes, others[0], seen, now)):
            # Beside decode steps, a slice's rows; alone, what ends before decode steps due.
            most = self.busy_rows(others[0], len(decodes)) if decodes else None
            if not decodes and (room := self._room(seen, now)) is not None:
                most, pause = room
                if most < MIN_SLICE:
                    return pause  # decode steps are due: the prompt goes with them
            prompts = self._prompts_together(others, most)
            if len(prompts) > 1:
                for frame in prompts:
                    self.queue.remove(frame)
            else:
                prompts = [self._slice(others[0], most, MIN_BESIDE if decodes else MIN_SLICE)]
        for frame in decodes:
            self.queue.remove(frame)
        for frame in prompts:
            if frame.sample:
                self._arrivals.through(frame.session)
        self._arrivals.ran([f.session for f in decodes])
        return (fitted(decodes) if len(decodes) > 1 else decodes) + prompts

    def passed(self, batch: list[StepFrame], now: float) -> None:
        """A pass of `batch` (from `take`) ended: its decode steps go on from here."""
        self._arrivals.left([f.session for f in batch if one_token(f)], now)

    def continues(self, frame: StepFrame) -> bool:
        """Whether this stage's cache of the frame's session reaches where it starts."""
        if frame.session not in self.shard.sessions:
            return frame.start == 0
        return not self.shard.layer_ids or self.shard.cache_length(frame.session) >= frame.start

    def slice_rows(
        self, share: float = 1.0, steps: int | None = None, beside: bool = False
    ) -> int | None:
        """Prompt rows that cost `share` of a pass of `steps` decode steps here, or of the
        decode passes' average where the count is not known, at a row's price in any pass
        or (`beside`) beside decode steps (None: not measured)."""
        costs = self.costs
        price = costs.beside_ms if beside else costs.row_ms
        if not price:
            return None
        ms = costs.step_ms if steps is None else costs.decode_ms(steps)
        return max(MIN_BESIDE, round(share * ms / price))

    def busy_rows(self, prompt: StepFrame | None = None, steps: int | None = None) -> int:
        """Prompt rows to run beside `steps` decode steps: a slice, the least one before it
        is measured. Deep in a long `prompt` (from its start, where its frames say where it
        ends), less, at a row's price beside decode steps, and the least slice beside them
        until that is measured."""
        deep = prompt is not None and _deep(prompt)
        if deep and steps is not None:
            return self.slice_rows(LONG_SHARE, steps, beside=True) or MIN_BESIDE
        return self.slice_rows(LONG_SHARE if deep else 1.0, steps) or MIN_SLICE

    def _apart(
        self, decodes: list[StepFrame], prompt: StepFrame, waiting: set[str], now: float
    ) -> bool:
        """Whether to leave a long prompt out of a pass of decode steps: where the steps'
        time away from here (and the steps of others due) leaves room after their pass for
        a pass of the prompt alone, it goes there, and the steps' pass stays a decode pass.
        A 2-peer mesh's first stage, the faster, ran slices beside the steps that doubled
        their pass there, with time to spare while they were away (docs/data-plane.md)."""
        costs = self.costs
        if not _deep(prompt) or not costs.row_ms or not costs.step_ms:
            return False
        away = self._arrivals.away([f.session for f in decodes])
        if away is None:
            return False
        end = now + costs.decode_ms(len(decodes)) / 1000
        back = end + away
        if (due := self._arrivals.next_due(waiting, set(self.shard.sessions), now)) is not None:
            back = min(back, due)
        return self._alone_rows(back - end) >= MIN_SLICE

    def _joined(self, frame: StepFrame) -> bool:
        """Join a prompt's chunk to the one before it if that still waits here: a prompt
        then waits as one frame however the stage before cut it, so its slices do not fill
        the queue (holding up other sessions' steps behind them on the socket) and are cut
        to this stage's own measure."""
        for i in range(len(self.queue) - 1, -1, -1):
            before = self.queue[i]
            if before.session != frame.session:
                continue
            if (
                before.sample
                or before.draft
                or (before.epoch, before.attempt, before.step)
                != (frame.epoch, frame.attempt, frame.step)
                or before.start + before.tensor.shape[0] != frame.start
                or before.tensor.dtype != frame.tensor.dtype
                or before.tensor.shape[1:] != frame.tensor.shape[1:]
            ):
                return False
            # The last chunk, reaching back to where the first starts: what ends the prompt
            # (its sampling, draft, feeding on) is the last chunk's.
            tensor = joined(before.tensor, frame.tensor)
            self.queue[i] = replace(frame, start=before.start, tensor=tensor)
            return True
        return False

    def _prompts_together(self, others: list[StepFrame], most: int | None) -> list[StepFrame]:
        """The oldest waiting prompts that can share one pass, whole, in at most `most` rows.
        Answers that start together then decode together, rather than one wave per prompt."""
        together: list[StepFrame] = []
        total = 0
        for frame in others:  # each continues here: take() sent a stray off alone
            if len(together) == MAX_BATCH:
                break
            total += frame.tensor.shape[0]
            if most is not None and total > most:
                break
            together.append(frame)
        return together

    def _room(self, waiting: set[str], now: float) -> tuple[int, float] | None:
        """Prompt rows a pass can run before the next decode step due here, and how long to
        wait for that step (None: none is due, or costs are not measured yet). A prompt's
        pass costs about a decode step plus its rows; one started just before decode steps
        are due would hold them for all of it, and they would then wait for a second pass
        with a slice of their own."""
        costs = self.costs
        if not costs.row_ms or not costs.step_ms:
            return None
        due = self._arrivals.next_due(waiting, set(self.shard.sessions), now)
        if due is None:
            return None
        room = self._alone_rows(due - now)
        # No more than a slice even so: a row costs more as the prompt's context grows, and
        # the rhythm the steps are due by is a guess. Waited for until a pass after it is due.
        most = min(room, max(self.busy_rows(), MIN_SLICE))
        return max(0, most), max(due - now, 0.0) + costs.step_ms / 1000

    def _alone_rows(self, seconds: float) -> int:
        """Prompt rows a pass of them alone runs in `seconds` here: about a decode step's
        pass and their price (costs measured)."""
        return int((seconds * 1000 - self.costs.step_ms) / self.costs.row_ms)

    def _hold(self, waiting: set[str], now: float) -> float:
        """Seconds to hold a decode batch: at most one decode pass's time in all, what the
        rows waited for would cost in a pass of their own."""
        since = self._holding_since if self._holding_since is not None else now
        live = set(self.shard.sessions)
        step_s = self.costs.step_ms / 1000
        hold = self._arrivals.hold(waiting, live, now, since, step_s, self.costs.pass_ms.get)
        if hold and self._holding_since is None:
            self._holding_since = now
            self.holds += 1
        return hold

    def _slice(self, frame: StepFrame, most: int | None, least: int) -> StepFrame:
        """Take `frame`, or its first `most` rows (beside decode steps, or before some are
        due), or a pass's worth when other sessions may be decoding here (they would wait for
        the whole of it); the rest stays in the queue, in its place. A cut of fewer than
        `least` rows takes the whole frame."""
        total = frame.tensor.shape[0]
        keep = len(frame.draft) + 1  # the rows sampled stay together, in the last slice
        cut = total - keep
        if most is not None:
            cut = min(cut, most)
        elif (rows_ := self.slice_rows()) and len(self.shard.sessions) > 1:
            cut = min(cut, max(rows_, MIN_SLICE))
        if cut < least or cut >= total - keep:
            self.queue.remove(frame)
            return frame
        head = replace(frame, tensor=rows(frame.tensor, 0, cut), sample=False, draft=())
        rest = replace(frame, start=frame.start + cut, tensor=rows(frame.tensor, cut, total))
        self.queue[self.queue.index(frame)] = rest
        return head

    def decodable(self, frame: StepFrame) -> bool:
        # A cache may hold more than the step continues from: a draft's unconfirmed tokens.
        return one_token(frame) and frame.session in self.shard.sessions and self.continues(frame)
