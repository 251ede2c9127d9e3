"""One stage of the chain: runs its shard over incoming steps, each session's in order, batching
decode steps of different sessions into one forward pass, and passes results on.

Decoding comes first: waiting decode steps run as one batch, with at most one slice of a
prompt inside it (chunked prefill mixed with decoding, as in Sarathi-Serve: the pass packs
every session's positions without padding, so the slice costs its own rows and the weights
are read once for both). A slice is cut to cost about one more decode batch (half of one
deep in a long prompt), so an answer that is decoding waits for at most that much more per
stage while a long prompt goes through.

Forward passes run in the model thread so the peer's event loop (gossip, sockets) stays
responsive, except decode passes short enough to run on the loop itself while that thread is
idle (worker.run_inline: they then do not share the GIL with the loop's work); whatever else
touches a cache (drops, handoffs) runs in the model thread too, so never under a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from meshshard.chain.drafts import Drafter
from meshshard.chain.links import BULK, lane
from meshshard.chain.picks import Pick, Picks, split_rows
from meshshard.chain.speculate import accepted, confirmed
from meshshard.chain.tensors import from_wire, joined, rows, to_wire
from meshshard.chain.waves import Arrivals, wave_rows
from meshshard.chain.worker import run_inline, run_model
from meshshard.model.batching import MAX_BATCH
from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import Shard, UnknownSession
from meshshard.types import Epoch
from meshshard.wire import (
    DataFrame,
    ErrorCode,
    ErrorFrame,
    PickFrame,
    StepFrame,
    TensorData,
    TokenFrame,
    WireError,
)

logger = logging.getLogger(__name__)

Send = Callable[[str, DataFrame], Awaitable[None]]


@dataclass(frozen=True)
class Normed:
    """A lone greedy step's normed hidden states [rows, hidden] (its token's, and its
    draft's), whose head is split between the last stage and the first (chain/picks.py)."""

    hidden: torch.Tensor


Output = TensorData | tuple[int, ...] | Normed  # what a pass gives a step: hidden states, or tokens
# (steps in a batch, seconds its forward pass took, whether all were single-token decodes)
Observe = Callable[[int, float, bool], None]
MAX_QUEUE = 64  # steps waiting here before senders are made to wait
STEP_WEIGHT = 0.2  # of the newest batch in the step time average
OUTBOX = 2  # batches computed ahead of their sending
MIN_SLICE = 16  # prompt rows a pass of prompts alone holds at least: fewer waste its weights
# ... and a slice beside decode steps, which pay the weights' reading: at a long prompt's end on
# a slow stage a row costs a tenth of a decode pass there, and 16 rows held every answer for
# two (lan-3's half-core laptop, testbed.md); fewer would spread a prompt over too many passes.
MIN_BESIDE = 4
# Past this many positions a prompt is a long one (a document, not a chat turn): its slices
# beside decode steps cost LONG_SHARE of a decode pass, so answers it holds up for seconds keep
# within 3x their usual gap though a pass runs long (lan-3: 8 and then 9 prompt rows beside
# two steps in 126 and 223 ms, testbed.md). Shorter prompts, and a long one's first
# positions, take a whole pass's worth, so answers asked together start together: at half,
# 16 asked at once on lan-3 were never all decoding at the same time (run 22).
LONG_PROMPT = 256
LONG_SHARE = 0.5
# A decode pass measured at most this long runs on the event loop (worker.run_inline): a probe
# arriving meanwhile waits for it, well inside probe timeouts (150-200 ms).
INLINE_MS = 40.0


class CacheMiss(Exception):
    """A step continues from a position this stage's cache does not reach."""

    def __init__(self, have: int) -> None:
        super().__init__(f"this stage holds {have} positions of the session")
        self.have = have


def _fitted(batch: list[StepFrame]) -> list[StepFrame]:
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


def _sampled(batch: list[StepFrame], outs: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """The tokens each step's logits confirm. Greedy steps' rows are picked by one argmax
    over all of them (one copy off the device); others sample with their seeds, row by row."""
    greedy = [i for i, f in enumerate(batch) if f.sample and f.sampling.temperature == 0]
    logits = [outs[i].reshape(-1, outs[i].shape[-1]) for i in greedy]
    best = torch.argmax(torch.cat(logits), dim=-1).tolist() if logits else []
    picked: dict[int, list[int]] = {}
    for i, rows_of_i in zip(greedy, logits, strict=True):
        n = rows_of_i.shape[0]
        picked[i], best = best[:n], best[n:]
    tokens: list[tuple[int, ...]] = []
    for i, (f, out) in enumerate(zip(batch, outs, strict=True)):
        if not f.sample:
            tokens.append(())
            continue
        if i in picked:
            sample = _looked_up(picked[i], f.step)
        else:
            s = f.sampling
            sample = Sampler(SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed))
        tokens.append(confirmed(sample, out.cpu(), f.draft, f.step))
    return tokens


def _one_token(frame: StepFrame) -> bool:
    """Whether the frame feeds one new token (maybe with a draft after it): a decode step."""
    return frame.tensor.shape[0] - len(frame.draft) == 1


def _decoding(batch: list[StepFrame]) -> bool:
    return all(f.tensor.shape[0] == 1 for f in batch)


def _verifying(batch: list[StepFrame]) -> int | None:
    """The rows of a pass of decode steps that verifies drafts (None: it verifies none)."""
    if not any(f.draft for f in batch) or not all(_one_token(f) for f in batch):
        return None
    return sum(f.tensor.shape[0] for f in batch)


def _followed(frame: StepFrame, tokens: tuple[int, ...]) -> StepFrame | None:
    """The step after `frame` that the last stage sends to the first itself, when the origin
    asked for it (`loop`) and the answer goes on: tokens then go round the chain without a
    hop through the origin. It feeds the last token at its position: a draft's positions
    past it were not confirmed, and the first stage drafts anew (chain/drafts.py)."""
    step = frame.step + len(tokens)
    if not frame.loop or step > frame.until or set(tokens) & set(frame.stops):
        return None
    ids = torch.tensor(tokens[-1:], dtype=torch.int64)
    start = frame.start + frame.tensor.shape[0] - len(frame.draft) + len(tokens) - 1
    return replace(frame, step=step, start=start, tensor=to_wire(ids), sample=True, draft=())


def _looked_up(tokens: list[int], step: int) -> Callable[[torch.Tensor, int], int]:
    """A sampler that answers from tokens picked already: step + j's is tokens[j]."""
    return lambda _, k: tokens[k - step]


def _moved(average: float, sample: float) -> float:
    return sample if not average else average + STEP_WEIGHT * (sample - average)


def _row_price(
    row_ms: float, ms: float, steps: int, rows_: int, pass_ms: Mapping[int, float], step_ms: float
) -> float:
    """The price of a prompt row, moved by a pass of `steps` decode steps and `rows_` prompt
    rows that took `ms`: what the steps (or one, for the weights' reading) cost alone, plus
    the rows. Beside a count of steps not yet timed alone, what the rows added is not known:
    a pass of fewer steps taken for theirs charged the rows with the rest, and the price rose
    as a burst's answers joined, cutting its later prompts into ever smaller slices (lan-3,
    docs/experiments/burst-16.txt: 31 rows a pass shrinking to 4)."""
    base = pass_ms.get(steps) if steps else step_ms
    return row_ms if base is None else _moved(row_ms, max(ms - base, 0.0) / rows_)


class StageWorker:
    def __init__(
        self,
        shard: Shard,
        epoch: Epoch,
        next_addr: str | None,
        send: Send,
        observe: Observe | None = None,
        waves: int = 1,
        head_share: float = 0.0,
        drafter: Drafter | None = None,
    ) -> None:
        self.shard = shard
        # Drafts for answers the chain feeds itself are made where it feeds them: here, at
        # the first stage (the peer's, so they outlive a plan that keeps it first).
        self._drafter = drafter if shard.is_first else None
        self.waves = waves  # the chain's decoding sessions spread over (the plan's)
        # Vocabulary rows the first stage scores of a lone greedy step (the plan's share),
        # where this last stage's head is tied to the first stage's embedding.
        spec = shard.spec
        tied = next_addr is None and spec.tied_embeddings and not shard.is_first
        self.head_rows = split_rows(head_share, spec.vocab_size) if tied else 0
        # Passes whose head was split (here, at the last stage), by rows: their averages and
        # how many of each ran (a split pass is one step: split_steps).
        self.split_ms: dict[int, float] = {}
        self.split_passes: Counter[int] = Counter()
        self._picks = Picks()  # ... halves waiting for their other half (the first stage)
        self.epoch = epoch
        self.next_addr = next_addr  # None: this is the last stage, it samples
        self._send = send
        self._queue: deque[StepFrame] = deque()
        self._has_work = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self.steps = 0
        self.batches = 0
        self.step_ms = 0.0  # moving average of one decode batch's forward pass
        self.row_ms = 0.0  # ... and of what one more prompt row adds to a pass
        self.forward_s = 0.0  # wall time of all forward passes
        self.forward_cpu_s = 0.0  # ... and the CPU time of the thread that ran them
        self._observe = observe
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrivals = Arrivals[str]()
        self._holding_since: float | None = None
        self.holds = 0  # batches held for rows due soon
        self.pass_ms: dict[int, float] = {}  # decode passes by rows: whether holding pays
        self.passes: Counter[int] = Counter()  # ... how many of each ran
        self.verify_ms: dict[int, float] = {}  # passes of decode steps with drafts, by rows
        self._outbox: asyncio.Queue[tuple[list[StepFrame], Sequence[Output]]] = asyncio.Queue(
            OUTBOX
        )
        # A prompt's activations go out by a sender of their own: on a slow link they would
        # hold up the decode steps computed after them (links.py sends them by another socket).
        self._bulk: asyncio.Queue[tuple[StepFrame, Output]] = asyncio.Queue()
        self._unsent = 0  # batches and bulk frames computed and not yet sent

    @property
    def split_steps(self) -> int:
        """Steps whose head was split here: one a split pass."""
        return sum(self.split_passes.values())

    async def refuse_queued(self, message: str) -> None:
        """This stage is being replaced: tell the origin of every waiting step."""
        while self._queue:
            await self._error(self._queue.popleft(), ErrorCode.STALE_EPOCH, message)
        self._has_room.set()

    async def put(self, frame: StepFrame) -> None:
        if frame.head:
            await self._pick_ours(frame)
            return
        while len(self._queue) >= MAX_QUEUE and not self._closing:
            self._has_room.clear()
            await self._has_room.wait()
        if self._closing:
            await self._error(frame, ErrorCode.STALE_EPOCH, "this stage moved to a new plan")
            return
        if self._drafter is not None:
            frame = self._drafter.fed(frame)
        self._arrivals.arrived(frame.session, time.perf_counter(), _one_token(frame))
        if not self._joined(frame):
            self._queue.append(frame)
        self._has_work.set()

    async def _pick_ours(self, frame: StepFrame) -> None:
        """A split step's rows [0, head) of the vocabulary, scored as it arrives (a few ms,
        while the last stage scores the rest): its tokens once both picks are in."""
        vocab = self.shard.spec.vocab_size
        if not self.shard.is_first or self.shard.head_weight is None or frame.head >= vocab:
            message = f"this stage cannot score rows [0, {frame.head}) of a split head"
            await self._error(frame, ErrorCode.BAD_FRAME, message)
            return
        hidden = from_wire(frame.tensor)
        logits, tokens = await run_inline(self._pick, hidden, 0, frame.head)
        if (picked := self._picks.ours(frame, Pick(logits, tokens))) is not None:
            await self._picked(frame, picked)

    async def take_pick(self, frame: PickFrame) -> None:
        """The last stage's pick of a split step."""
        if (got := self._picks.theirs(frame)) is not None:
            await self._picked(*got)

    async def _picked(self, frame: StepFrame, picked: tuple[int, ...]) -> None:
        """A split step's tokens, those of its picks the draft confirms: into the chain as
        the step they feed (what the chain waits for), unless they end the answer, and to
        its origin, as the last stage sends them unsplit."""
        tokens = accepted(picked, frame.draft)
        if (follow := _followed(replace(frame, head=0), tokens)) is not None:
            await self.put(follow)
        drafted = len(frame.draft)
        copy = TokenFrame(frame.epoch, frame.session, frame.step, tokens, frame.attempt, drafted)
        try:
            await self._send(frame.origin, copy)
        except Exception as e:
            logger.warning("could not send %s's tokens to its origin: %s", frame.session, e)

    def _pick(
        self, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """A pick, counted with the forward passes (it is the head's share of one), so the
        step-cost meter does not take it for work beside them."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.shard.pick(hidden, start, end)
        finally:
            self.forward_s += time.perf_counter() - wall
            self.forward_cpu_s += time.thread_time() - cpu

    def forget_picks(self, session: str) -> None:
        self._picks.forget(session)

    def _joined(self, frame: StepFrame) -> bool:
        """Join a prompt's chunk to the one before it if that still waits here: a prompt
        then waits as one frame however the stage before cut it, so its slices do not fill
        the queue (holding up other sessions' steps behind them on the socket) and are cut
        to this stage's own measure."""
        for i in range(len(self._queue) - 1, -1, -1):
            before = self._queue[i]
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
            self._queue[i] = replace(frame, start=before.start, tensor=tensor)
            return True
        return False

    async def run(self) -> None:
        """Forward passes, with their outputs sent beside them: the next batch starts while
        the last one's frames go out."""
        async with asyncio.TaskGroup() as tg:
            senders = [tg.create_task(self._send_outputs()), tg.create_task(self._send_bulk())]
            await self._compute()
            await self._sent()
            for sender in senders:
                sender.cancel()

    async def _sent(self) -> None:
        await self._outbox.join()
        await self._bulk.join()

    async def _compute(self) -> None:
        while not self._closing:
            await self._has_work.wait()
            self._idle.clear()
            try:
                while self._queue and not self._closing:
                    batch = self._take_batch()
                    if isinstance(batch, float):  # held for rows due soon
                        self._has_work.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._has_work.wait(), batch)
                        continue
                    if len(self._queue) < MAX_QUEUE:
                        self._has_room.set()
                    await self._run_batch(batch)
            finally:
                self._idle.set()
            self._has_work.clear()

    async def close(self, message: str) -> None:
        """Finish the batch in hand (a cache is never moved under a forward pass), then
        refuse what is still queued."""
        self._closing = True
        self._has_work.set()
        await self._idle.wait()
        await self._sent()
        await self.refuse_queued(message)

    def _take_batch(self) -> list[StepFrame] | float:
        """The waiting decode steps (a token, and maybe a draft to verify) of up to a wave's
        sessions (waves.wave_rows), and with them other steps (prompts, feeds after a
        replay): whole short prompts of several sessions together, else a slice of the
        oldest. Only a session's oldest waiting frame may go. Or seconds to wait: to hold the
        decode steps for others due soon (waves.py), or a prompt for decode steps due before
        a pass of it would end."""
        decodes: list[StepFrame] = []
        others: list[StepFrame] = []
        seen: set[str] = set()
        wave = wave_rows(len(self.shard.sessions), self.waves)
        for frame in self._queue:
            if frame.session in seen:
                continue
            seen.add(frame.session)
            if not self._decodable(frame):
                others.append(frame)
            elif len(decodes) < wave:
                decodes.append(frame)
        if (stray := next((f for f in others if not self._continues(f)), None)) is not None:
            # Alone: its pass meets the miss and says so (unknown session, or where the
            # stage's cache ends); in a packed pass it would start afresh at position 0.
            self._queue.remove(stray)
            return [stray]
        if decodes and len(decodes) < wave and (hold := self._hold(seen)):
            return hold
        self._holding_since = None
        prompts: list[StepFrame] = []
        if others:
            # Beside decode steps, a slice's rows; alone, what ends before decode steps due.
            most = self._busy_rows(others[0], len(decodes)) if decodes else None
            if not decodes and (room := self._room(seen)) is not None:
                most, pause = room
                if most < MIN_SLICE:
                    return pause  # decode steps are due: the prompt goes with them
            prompts = self._prompts_together(others, most)
            if len(prompts) > 1:
                for frame in prompts:
                    self._queue.remove(frame)
            else:
                prompts = [self._slice(others[0], most, MIN_BESIDE if decodes else MIN_SLICE)]
        for frame in decodes:
            self._queue.remove(frame)
        self._arrivals.ran([f.session for f in decodes])
        return (_fitted(decodes) if len(decodes) > 1 else decodes) + prompts

    def _prompts_together(self, others: list[StepFrame], most: int | None) -> list[StepFrame]:
        """The oldest waiting prompts that can share one pass, whole, in at most `most` rows.
        Answers that start together then decode together, rather than one wave per prompt."""
        together: list[StepFrame] = []
        total = 0
        for frame in others:  # each continues here: _take_batch sent a stray off alone
            if len(together) == MAX_BATCH:
                break
            total += frame.tensor.shape[0]
            if most is not None and total > most:
                break
            together.append(frame)
        return together

    def _continues(self, frame: StepFrame) -> bool:
        """Whether this stage's cache of the frame's session reaches where it starts."""
        if frame.session not in self.shard.sessions:
            return frame.start == 0
        return not self.shard.layers or self.shard.cache_length(frame.session) >= frame.start

    def _slice_rows(self, share: float = 1.0, steps: int | None = None) -> int | None:
        """Prompt rows that cost `share` of a pass of `steps` decode steps here, or of the
        decode passes' average where the count is not known (None: not measured)."""
        if not self.row_ms:
            return None
        ms = self.step_ms if steps is None else self._decode_ms(steps)
        return max(MIN_BESIDE, round(share * ms / self.row_ms))

    def _decode_ms(self, steps: int) -> float:
        """A pass of `steps` decode steps here: as timed, else one step's pass and a prompt
        row's price for each step more. Through a burst, prompts go beside every pass, so the
        counts its later answers decode at are not timed alone; slices sized by one step's
        pass stayed small as they joined, and the last prompts crawled in (lan-3,
        docs/experiments/burst-16.txt)."""
        timed = self.pass_ms.get(steps)
        if timed:
            return timed
        return (self.pass_ms.get(1) or self.step_ms) + (steps - 1) * self.row_ms

    def _busy_rows(self, prompt: StepFrame | None = None, steps: int | None = None) -> int:
        """Prompt rows to run beside `steps` decode steps: a slice (less, deep in a long
        `prompt`), the least one before it is measured."""
        deep = prompt is not None and prompt.start + prompt.tensor.shape[0] > LONG_PROMPT
        return self._slice_rows(LONG_SHARE if deep else 1.0, steps) or MIN_SLICE

    def _room(self, waiting: set[str]) -> tuple[int, float] | None:
        """Prompt rows a pass can run before the next decode step due here, and how long to
        wait for that step (None: none is due, or costs are not measured yet). A prompt's
        pass costs about a decode step plus its rows; one started just before decode steps
        are due would hold them for all of it, and they would then wait for a second pass
        with a slice of their own."""
        if not self.row_ms or not self.step_ms:
            return None
        now = time.perf_counter()
        due = self._arrivals.next_due(waiting, set(self.shard.sessions), now)
        if due is None:
            return None
        room = int(((due - now) * 1000 - self.step_ms) / self.row_ms)
        # No more than a slice even so: a row costs more as the prompt's context grows, and
        # the rhythm the steps are due by is a guess. Waited for until a pass after it is due.
        most = min(room, max(self._busy_rows(), MIN_SLICE))
        return max(0, most), max(due - now, 0.0) + self.step_ms / 1000

    def _hold(self, waiting: set[str]) -> float:
        """Seconds to hold a decode batch: at most one decode pass's time in all, what the
        rows waited for would cost in a pass of their own."""
        now = time.perf_counter()
        since = self._holding_since if self._holding_since is not None else now
        live = set(self.shard.sessions)
        hold = self._arrivals.hold(waiting, live, now, since, self.step_ms / 1000, self.pass_ms.get)
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
        elif (rows_ := self._slice_rows()) and len(self.shard.sessions) > 1:
            cut = min(cut, max(rows_, MIN_SLICE))
        if cut < least or cut >= total - keep:
            self._queue.remove(frame)
            return frame
        head = replace(frame, tensor=rows(frame.tensor, 0, cut), sample=False, draft=())
        rest = replace(frame, start=frame.start + cut, tensor=rows(frame.tensor, cut, total))
        self._queue[self._queue.index(frame)] = rest
        return head

    def _decodable(self, frame: StepFrame) -> bool:
        # A cache may hold more than the step continues from: a draft's unconfirmed tokens.
        return _one_token(frame) and frame.session in self.shard.sessions and self._continues(frame)

    async def _run_batch(self, batch: list[StepFrame]) -> None:
        started = time.perf_counter()
        split = self._splits(batch)
        run = run_inline if self._short(batch, split) else run_model
        try:
            outputs = await run(self._pass, batch, split)
        except CacheMiss as e:
            session = batch[0].session
            if session in self.shard.sessions:
                await self._error(batch[0], ErrorCode.CACHE_MISS, str(e), e.have)
            else:
                await self._error(
                    batch[0], ErrorCode.UNKNOWN_SESSION, f"unknown session {session!r}"
                )
            return
        except (ValueError, WireError, UnknownSession) as e:
            code = (
                ErrorCode.UNKNOWN_SESSION if isinstance(e, UnknownSession) else ErrorCode.BAD_FRAME
            )
            for frame in batch:
                await self._error(frame, code, str(e))
            return
        except Exception as e:  # a bug must cost these steps, not the peer
            logger.exception("stage failed on %d steps", len(batch))
            for frame in batch:
                await self._error(frame, ErrorCode.INTERNAL, f"stage failed: {e}")
            return
        seconds = time.perf_counter() - started
        self.forward_s += seconds
        self.steps += len(batch)
        self.batches += 1
        # A pass without its head is no measure of a decode pass here (holds, prompt
        # slices): its pace is measured apart (split_ms).
        decode = _decoding(batch) and not split
        ms = seconds * 1000
        verifying = _verifying(batch)
        if split:
            rows_ = verifying or 1
            self.split_ms[rows_] = _moved(self.split_ms.get(rows_, 0.0), ms)
            self.split_passes[rows_] += 1
        elif verifying is not None:
            self.verify_ms[verifying] = _moved(self.verify_ms.get(verifying, 0.0), ms)
        prompts = [f for f in batch if not _one_token(f)]
        prompt_rows = sum(f.tensor.shape[0] for f in prompts)
        logger.debug(
            "pass: %d decode steps, %d prompt rows, %.1f ms",
            len(batch) - len(prompts),
            prompt_rows,
            ms,
        )
        if decode:  # prefills take longer per step: they would hide the decode time
            self.step_ms = _moved(self.step_ms, ms)
            self.pass_ms[len(batch)] = _moved(self.pass_ms.get(len(batch), 0.0), ms)
            self.passes[len(batch)] += 1
        elif self.step_ms and prompt_rows >= MIN_BESIDE:
            self.row_ms = _row_price(
                self.row_ms, ms, len(batch) - len(prompts), prompt_rows, self.pass_ms, self.step_ms
            )
        if self._observe is not None:
            self._observe(len(batch), seconds, decode)
        self._unsent += 1
        await self._outbox.put((batch, outputs))
        # The sender goes first, then whatever else waits (a pass on the loop did not yield).
        await asyncio.sleep(0)

    def _short(self, batch: list[StepFrame], split: bool) -> bool:
        """Whether the batch is decode steps whose passes of its size (or without the head,
        `split`; or of its rows, verifying drafts) took at most INLINE_MS, with every output
        before it sent: a pass on the loop would hold up what is still going out (the rest
        of the last wave, behind one send that had to wait). On the loop, the peer's other
        work waits for the pass: an origin's on the tokens of the step that started it
        would otherwise share the interpreter lock with it (docs/data-plane.md)."""
        rows_ = _verifying(batch)
        if split:  # a pass of one row without its head: a decode pass's time till measured
            took = self.split_ms.get(rows_ or 1, 0.0) or (0.0 if rows_ else self.step_ms)
        elif rows_ is not None:
            took = self.verify_ms.get(rows_, 0.0)
        else:
            took = self.pass_ms.get(len(batch), 0.0) if _decoding(batch) else 0.0
        return not self._unsent and 0 < took <= INLINE_MS

    async def _send_outputs(self) -> None:
        while True:
            batch, outputs = await self._outbox.get()
            try:
                for frame, out in zip(batch, outputs, strict=True):
                    if isinstance(out, TensorData) and lane(frame) == BULK:
                        self._unsent += 1
                        self._bulk.put_nowait((frame, out))
                    else:
                        await self._emit(frame, out)
            finally:
                self._unsent -= 1
                self._outbox.task_done()

    async def _send_bulk(self) -> None:
        while True:
            frame, out = await self._bulk.get()
            try:
                await self._emit(frame, out)
            finally:
                self._unsent -= 1
                self._bulk.task_done()

    def _pass(self, batch: list[StepFrame], split: bool = False) -> Sequence[Output]:
        """The batch's forward pass, and what it passes on: hidden states as wire bytes, or
        at the last stage the tokens each step confirmed (greedy rows picked in one call),
        or the normed hidden states of a step whose head is `split`."""
        cpu = time.thread_time()
        try:
            outs = self._forward(batch, head=not split)
            if self.next_addr is not None:
                return [to_wire(out) for out in outs]
            if split:
                return [Normed(outs[0])]
            return _sampled(batch, outs)
        finally:
            self.forward_cpu_s += time.thread_time() - cpu

    def _splits(self, batch: list[StepFrame]) -> bool:
        """Whether to split the head of this batch: one greedy decode step (verifying a
        draft or not) of the only session here, whose next step the chain feeds itself (the
        other stages then wait)."""
        if not self.head_rows or len(batch) != 1 or len(self.shard.sessions) != 1:
            return False
        (f,) = batch
        greedy = f.sample and f.sampling.temperature == 0
        return greedy and bool(f.loop) and _one_token(f) and f.step + 1 <= f.until

    def _forward(self, batch: list[StepFrame], head: bool = True) -> list[torch.Tensor]:
        for f in batch:
            # What admission reserved, allocated once (a step that misses makes no session:
            # it must meet the miss it is).
            if f.reserve and self._continues(f):
                self.shard.reserve(f.session, f.reserve)
        if len(batch) > 1:
            for f in batch:
                self.shard.truncate(f.session, f.start)
            xs = [from_wire(f.tensor) for f in batch]
            read = [len(f.draft) + 1 if f.sample else 0 for f in batch]
            return self.shard.decode_batch([f.session for f in batch], xs, read)
        (frame,) = batch
        if self.shard.layers:
            # A resumed session continues from what the origin believes is cached: shorter
            # here means the origin must go back; longer means recompute (same values).
            have = self.shard.cache_length(frame.session)
            if have < frame.start:
                raise CacheMiss(have)
            self.shard.truncate(frame.session, frame.start)  # some layers may hold more
        x = from_wire(frame.tensor)
        positions = torch.arange(frame.start, frame.start + x.shape[0])
        logits = len(frame.draft) + 1 if frame.sample else 0  # a draft's positions are sampled
        return [self.shard.prefill(frame.session, x, positions, logits=logits, head=head)]

    async def _emit(self, frame: StepFrame, out: Output) -> None:
        try:
            if isinstance(out, TensorData):
                assert self.next_addr is not None
                await self._send(self.next_addr, replace(frame, tensor=out))
            elif isinstance(out, Normed):
                await self._split(frame, out.hidden)
            elif frame.sample:
                # The next step first (it is what the chain waits for), then the origin's copy.
                follow, failed = _followed(frame, out), None
                if follow is not None:
                    try:
                        await self._send(follow.loop, follow)
                    except Exception as e:
                        failed = e
                drafted = len(frame.draft)
                tokens = TokenFrame(
                    frame.epoch, frame.session, frame.step, out, frame.attempt, drafted
                )
                await self._send(frame.origin, tokens)
                if follow is not None and failed is not None:
                    await self._error(follow, ErrorCode.INTERNAL, f"first stage failed: {failed}")
        except Exception as e:  # a peer gone mid-send: tell the origin, keep serving others
            logger.warning("stage could not pass on %s step %d: %s", frame.session, frame.step, e)
            await self._error(frame, ErrorCode.INTERNAL, f"next hop failed: {e}")

    async def _split(self, frame: StepFrame, hidden: torch.Tensor) -> None:
        """The hidden states to the first stage first, then this stage's picks of the rest
        of the vocabulary: the two are scored at once. (The pick may run on the loop: a send
        has written its frame to the socket when it returns. In the model thread it ran
        later, 61.2 ms a token against 59.3 on the loop, chain-runs.txt.)"""
        await self._send(frame.loop, replace(frame, tensor=to_wire(hidden), head=self.head_rows))
        vocab = self.shard.spec.vocab_size
        logits, tokens = await run_inline(self._pick, hidden, self.head_rows, vocab)
        pick = PickFrame(frame.epoch, frame.session, frame.step, tokens, logits, frame.attempt)
        await self._send(frame.loop, pick)

    async def _error(self, frame: StepFrame, code: ErrorCode, message: str, have: int = 0) -> None:
        error = ErrorFrame(
            frame.epoch, frame.session, frame.step, code, message, frame.attempt, have
        )
        try:
            await self._send(frame.origin, error)
        except Exception as e:
            logger.warning("could not report %s to %s: %s", code, frame.origin, e)
