"""What a stage's forward passes cost, as it measured them: moving averages by kind and rows.

The stage's schedule cuts batches and prompt slices by them (schedule.py), the stage decides
by them which passes may run on the event loop, and the peer's status and profile show them
(the coordinator prices this stage's passes by the pace they imply, publish.py).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence

from meshshard.wire import StepFrame

STEP_WEIGHT = 0.2  # of the newest pass in an average
# Passes of a kind behind the pace a peer publishes (publish.py `paces`), which the planner
# prices its passes by: the schedule's averages follow the last few passes, and one pass held
# up by the host moved them a fifth of its delay (lan-3's desk, one row: its published pace
# ranged 1.07-1.40 while its passes averaged 31-36 ms an answer, docs/experiments/paces.txt).
PACE_PASSES = 32
# The least prompt rows a slice beside decode steps holds (schedule.py), and that price a row:
# those steps pay the weights' reading. At a long prompt's end on a slow stage a row costs a
# tenth of a decode pass there, and 16 rows held every answer for two (lan-3's half-core
# laptop, testbed.md). Not 4: on this project's 2-core host 2 steps passed alone in 31 ms,
# with 2 prompt rows in 48 and with 4 in 62 (passes of 5-8 rows cost twice those of 2-4),
# about the same price a row, so 4 rows held the answers longer for no more rows a
# millisecond (docs/experiments/gap-trace.txt).
MIN_BESIDE = 2


def one_token(frame: StepFrame) -> bool:
    """Whether the frame feeds one new token (maybe with a draft after it): a decode step."""
    return frame.tensor.shape[0] - len(frame.draft) == 1


def decoding(batch: Sequence[StepFrame]) -> bool:
    return all(f.tensor.shape[0] == 1 for f in batch)


def verifying(batch: Sequence[StepFrame]) -> int | None:
    """The rows of a pass of decode steps that verifies drafts (None: it verifies none)."""
    if not any(f.draft for f in batch) or not all(one_token(f) for f in batch):
        return None
    return sum(f.tensor.shape[0] for f in batch)


def moved(average: float, sample: float) -> float:
    return sample if not average else average + STEP_WEIGHT * (sample - average)


def row_price(
    row_ms: float, ms: float, steps: int, rows_: int, pass_ms: Mapping[int, float], step_ms: float
) -> float:
    """The price of a prompt row, moved by a pass of `steps` decode steps and `rows_` prompt
    rows that took `ms`: what the steps (or one, for the weights' reading) cost alone, plus
    the rows. Beside a count of steps not yet timed alone, what the rows added is not known:
    a pass of fewer steps taken for theirs charged the rows with the rest, and the price rose
    as a burst's answers joined, cutting its later prompts into ever smaller slices (lan-3,
    docs/experiments/burst-16.txt: 31 rows a pass shrinking to 4)."""
    base = pass_ms.get(steps) if steps else step_ms
    return row_ms if base is None else moved(row_ms, max(ms - base, 0.0) / rows_)


class LastPasses(dict[int, float]):
    """Each size's mean ms over its last PACE_PASSES passes. A window rather than a mean
    from the first pass: that kept a share of how the passes ran long before (lan-3 run 93,
    docs/experiments/paces.txt: a fresh mesh's first answer at 1.07-1.22x its next ones); a
    window lets passes go once as many newer ones have run."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[int, deque[float]] = {}

    def add(self, rows: int, ms: float) -> None:
        last = self._last.setdefault(rows, deque(maxlen=PACE_PASSES))
        last.append(ms)
        self[rows] = sum(last) / len(last)


class PassCosts:
    def __init__(self) -> None:
        self.step_ms = 0.0  # one decode pass, whatever its rows
        self.row_ms = 0.0  # what one more prompt row adds to a pass
        # ... to a pass of decode steps, read from those alone. A pass of prompts alone
        # shares the weights' reading among many rows; on a host whose passes of 5-8 rows
        # cost twice those of 2-4, a row came to 2.3 ms there against 4-8 beside 2 steps
        # (docs/experiments/gap-passes.txt, gap-trace.txt), and slices beside steps priced
        # so ran 2-4x the steps' pass.
        self.beside_ms = 0.0
        self.pass_ms: dict[int, float] = {}  # decode passes by rows: whether holding pays
        self.passes: Counter[int] = Counter()  # ... how many of each ran
        self.verify_ms: dict[int, float] = {}  # passes of decode steps with drafts, by rows
        # Passes whose head was split, or went whole to the first stage (a wave's), at a
        # last stage, by rows: no measure of a decode pass here, so apart; and how many of
        # each ran (a lone answer's split pass is one step, a wave's one step a row).
        self.split_ms: dict[int, float] = {}
        self.split_passes: Counter[int] = Counter()
        # The same two kinds, steadier: what the peer publishes its pace by.
        self.paced_ms = LastPasses()
        self.paced_split_ms = LastPasses()

    @property
    def split_steps(self) -> int:
        return sum(self.split_passes.values())

    def record(self, batch: Sequence[StepFrame], ms: float, split: bool) -> bool:
        """A pass of `batch` (its head `split` or not) took `ms`; whether it was a decode
        pass, the kind the peer's step-cost meter takes (a prefill costs more a step and
        would hide the decode time)."""
        decode = decoding(batch) and not split
        rows_ = verifying(batch)
        prompts = [f for f in batch if not one_token(f)]
        prompt_rows = sum(f.tensor.shape[0] for f in prompts)
        if split and not prompts:
            rows_ = rows_ or len(batch)
            self.split_ms[rows_] = moved(self.split_ms.get(rows_, 0.0), ms)
            self.split_passes[rows_] += 1
            self.paced_split_ms.add(rows_, ms)
        elif rows_ is not None:
            self.verify_ms[rows_] = moved(self.verify_ms.get(rows_, 0.0), ms)
        if decode:
            self.step_ms = moved(self.step_ms, ms)
            self.pass_ms[len(batch)] = moved(self.pass_ms.get(len(batch), 0.0), ms)
            self.passes[len(batch)] += 1
            self.paced_ms.add(len(batch), ms)
        elif self.step_ms and prompt_rows >= MIN_BESIDE:
            # Beside a wave whose head went to the first stage, the rows added to a pass
            # of its steps without theirs.
            timed = self.split_ms if split else self.pass_ms
            steps = len(batch) - len(prompts)
            self.row_ms = row_price(self.row_ms, ms, steps, prompt_rows, timed, self.step_ms)
            if steps:
                price = row_price(self.beside_ms, ms, steps, prompt_rows, timed, self.step_ms)
                self.beside_ms = price
        return decode

    def took(self, batch: Sequence[StepFrame], split: bool) -> float:
        """What a pass of decode steps like `batch` took: of its size, or without the head
        (`split`), or of its rows verifying drafts; 0 where not measured or not decoding."""
        rows_ = verifying(batch)
        if rows_ is None and not decoding(batch):
            return 0.0  # prompt rows in it
        if split:  # a pass without its head: a decode pass's time till measured
            return self.split_ms.get(rows_ or len(batch), 0.0) or (0.0 if rows_ else self.step_ms)
        if rows_ is not None:
            return self.verify_ms.get(rows_, 0.0)
        return self.pass_ms.get(len(batch), 0.0)

    def decode_ms(self, steps: int) -> float:
        """A pass of `steps` decode steps here: as timed, else one step's pass and a prompt
        row's price for each step more. Through a burst, prompts go beside every pass, so the
        counts its later answers decode at are not timed alone; slices sized by one step's
        pass stayed small as they joined, and the last prompts crawled in (lan-3,
        docs/experiments/burst-16.txt)."""
        # Where a wave's head goes to the first stage, its steps pass here without it,
        # beside a slice too (stage.py `_splits`): timed so.
        timed = (self.split_ms.get(steps) if steps > 1 else None) or self.pass_ms.get(steps)
        if timed:
            return timed
        return (self.pass_ms.get(1) or self.step_ms) + (steps - 1) * self.row_ms
