"""Which steps a stage's next pass runs (chain/schedule.py), without a model or a loop: frames
of token ids at a first stage whose caches are said, times given by the test."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

from meshshard.chain import passes
from meshshard.chain.passes import PassCosts
from meshshard.chain.schedule import Schedule
from meshshard.chain.tensors import to_wire
from meshshard.model.batching import MAX_BATCH
from meshshard.types import Epoch
from meshshard.wire import Sampling, StepFrame

EPOCH = Epoch(1, "a")
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=0)


@dataclass
class Caches:
    """A shard's caches as the test says them: session -> positions held."""

    held: dict[str, int] = field(default_factory=dict)
    layer_ids: tuple[int, ...] = (0, 1)

    @property
    def sessions(self) -> list[str]:
        return list(self.held)

    def cache_length(self, session: str) -> int:
        return self.held.get(session, 0)


def frame(
    session: str, start: int, rows: int, *, sample: bool = True, draft: int = 0, step: int = 0
) -> StepFrame:
    ids = torch.arange(rows + draft) % 50
    drafted = tuple(range(draft))
    return StepFrame(
        EPOCH, session, step, start, to_wire(ids), "origin", sample, GREEDY, draft=drafted
    )


def schedule(held: dict[str, int], step_ms: float = 0.0, row_ms: float = 0.0) -> Schedule:
    costs = PassCosts()
    costs.step_ms, costs.row_ms = step_ms, row_ms
    return Schedule(Caches(held), costs)


def take(s: Schedule, now: float = 0.0) -> list[tuple[str, int, int]]:
    """The next batch, each frame as (session, start, rows), run: the caches then hold it."""
    batch = s.take(now)
    assert isinstance(batch, list)
    for f in batch:
        s.shard.held[f.session] = f.start + f.tensor.shape[0] - len(f.draft)
    return [(f.session, f.start, f.tensor.shape[0]) for f in batch]


def test_decode_steps_go_first_with_a_slice_of_a_prompt_priced_beside_them() -> None:
    """Three steps cost 4 ms and a row's 0.25 for each step more: 18 prompt rows beside them
    cost as much again; the rest of the prompt waits in its place, then goes a slice at a
    time (16 rows: one pass's worth while others decode here)."""
    s = schedule({"s0": 5, "s1": 3, "s2": 8}, step_ms=4.0, row_ms=0.25)
    s.add(frame("long", 0, 40), 0.0)
    for name, n in (("s0", 5), ("s1", 3), ("s2", 8)):
        s.add(frame(name, n, 1), 0.0)
    assert take(s) == [("s0", 5, 1), ("s1", 3, 1), ("s2", 8, 1), ("long", 0, 18)]
    assert take(s) == [("long", 18, 16)]
    assert take(s) == [("long", 34, 6)]
    assert not s.queue


def test_a_slice_deep_in_a_long_prompt_costs_half_a_decode_pass_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a row's price beside decode steps (a prompt alone's is lower: 0.1 ms here), and
    the least slice until a slice beside them has measured it."""
    monkeypatch.setattr("meshshard.chain.schedule.LONG_PROMPT", 30)
    for beside_ms, rows in ((0.0, passes.MIN_BESIDE), (0.25, 9)):
        s = schedule({"s0": 5, "s1": 3, "s2": 8}, step_ms=4.0, row_ms=0.1)
        s.costs.beside_ms, s.costs.pass_ms[3] = beside_ms, 4.5  # the 3 steps' pass, timed
        s.add(frame("long", 0, 40), 0.0)
        for name, n in (("s0", 5), ("s1", 3), ("s2", 8)):
            s.add(frame(name, n, 1), 0.0)
        assert take(s)[-1] == ("long", 0, rows)


def test_a_long_prompt_is_long_from_its_first_chunk() -> None:
    """A stage that holds only a long prompt's first rows knows from its frames where the
    prompt ends; a short prompt's slice beside the steps costs a whole decode pass."""
    for ends, rows in ((2000, 9), (0, 18)):
        s = schedule({"s0": 5, "s1": 3, "s2": 8}, step_ms=4.0, row_ms=0.25)
        s.costs.beside_ms = 0.25
        s.add(replace(frame("p", 0, 40, sample=False), ends=ends), 0.0)
        for name, n in (("s0", 5), ("s1", 3), ("s2", 8)):
            s.add(frame(name, n, 1), 0.0)
        assert take(s)[-1] == ("p", 0, rows)


def test_a_sessions_frames_keep_their_order_and_the_chunks_of_a_prompt_join() -> None:
    s = schedule({"s0": 4})
    s.add(frame("p", 0, 6, sample=False), 0.0)
    s.add(frame("p", 6, 4), 0.0)  # the prompt's last chunk: one frame of 10 rows now
    s.add(frame("s0", 4, 1), 0.0)
    s.add(frame("s0", 5, 1, step=1), 0.0)  # its next step cannot go before this one
    assert [(f.session, f.start, f.tensor.shape[0]) for f in s.queue] == [
        ("p", 0, 10),
        ("s0", 4, 1),
        ("s0", 5, 1),
    ]
    assert s.queue[0].sample  # what ends the prompt is the last chunk's
    assert take(s) == [("s0", 4, 1), ("p", 0, 10)]
    assert take(s) == [("s0", 5, 1)]


def test_a_step_this_stage_cannot_continue_goes_alone_to_meet_its_miss() -> None:
    """Packed with others it would start afresh at position 0; alone, its pass says where
    this stage's cache ends (or that the session is unknown)."""
    s = schedule({"s0": 4, "s1": 2})
    s.add(frame("s0", 4, 1), 0.0)
    s.add(frame("s1", 7, 3, sample=False), 0.0)  # the cache holds 2 positions, not 7
    s.add(frame("gone", 3, 1), 0.0)
    assert take(s) == [("s1", 7, 3)]
    assert take(s) == [("gone", 3, 1)]
    assert take(s) == [("s0", 4, 1)]


def test_a_shard_without_layers_continues_any_session_it_holds() -> None:
    s = Schedule(Caches({"s0": 0}, layer_ids=()), PassCosts())
    s.add(frame("s0", 9, 1), 0.0)
    assert take(s) == [("s0", 9, 1)]


def test_short_prompts_asked_together_share_one_pass_up_to_a_slice() -> None:
    s = schedule({})
    for i, rows in enumerate((5, 3, 8)):
        s.add(frame(f"p{i}", 0, rows), 0.0)
    assert take(s) == [("p0", 0, 5), ("p1", 0, 3), ("p2", 0, 8)]
    # Beside a decode step, at most a slice's rows (here 16): whole prompts while they fit.
    s = schedule({"s0": 4}, step_ms=4.0, row_ms=0.25)
    for i, rows in enumerate((7, 6, 8)):
        s.add(frame(f"p{i}", 0, rows), 0.0)
    s.add(frame("s0", 4, 1), 0.0)
    assert take(s) == [("s0", 4, 1), ("p0", 0, 7), ("p1", 0, 6)]


def test_a_prompt_waits_for_a_decode_step_due_before_its_pass_would_end() -> None:
    """s0 decodes every 150 ms and a pass costs 20 ms: 10 ms before its step is due, a
    prompt does not start a pass the step would wait for; it goes with the step."""
    s = schedule({"s0": 4}, step_ms=20.0, row_ms=1.0)
    for i in range(3):
        s.add(frame("s0", 4 + i, 1, step=i), 0.15 * i)
        assert take(s, 0.15 * i) == [("s0", 4 + i, 1)]
    s.add(frame("p", 0, 70), 0.44)
    wait = s.take(0.44)
    assert wait == pytest.approx(0.01 + 0.02)
    s.add(frame("s0", 7, 1, step=3), 0.45)
    assert take(s, 0.45) == [("s0", 7, 1), ("p", 0, 20)]
    # With room before the next step, a prompt alone runs what ends before it is due.
    s = schedule({"s0": 4}, step_ms=20.0, row_ms=1.0)
    for i in range(2):
        s.add(frame("s0", 4 + i, 1, step=i), 0.15 * i)
        take(s, 0.15 * i)
    s.add(frame("p", 0, 70), 0.16)
    # 120 ms of room, but a slice at most: what a decode pass costs, 20 rows.
    assert take(s, 0.16) == [("p", 0, 20)]


def test_a_long_prompt_goes_alone_while_the_steps_are_away_where_a_pass_of_it_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """s0's steps spend 150 ms away from here, a pass of its step costs 20 ms and one of 16
    prompt rows alone 36: a long prompt's rows go in that time, not beside the step, which
    passes alone. Where the steps are away 30 ms, a slice goes beside them."""
    monkeypatch.setattr("meshshard.chain.schedule.LONG_PROMPT", 30)
    for away, beside in ((0.15, False), (0.03, True)):
        s = schedule({"s0": 4}, step_ms=20.0, row_ms=1.0)
        s.costs.beside_ms = 1.0
        t = 0.0
        for i in range(2):
            s.add(frame("s0", 4 + i, 1, step=i), t)
            batch = s.take(t)
            assert isinstance(batch, list)
            s.shard.held["s0"] = 5 + i
            s.passed(batch, t + 0.02)
            t += 0.02 + away
        s.add(frame("long", 0, 40), t - 0.01)
        s.add(frame("s0", 6, 1, step=2), t)
        if beside:
            assert take(s, t) == [("s0", 6, 1), ("long", 0, 10)]  # half a pass's worth
            continue
        batch = s.take(t)
        assert isinstance(batch, list) and [f.session for f in batch] == ["s0"]
        s.shard.held["s0"] = 7
        s.passed(batch, t + 0.02)
        assert take(s, t + 0.02) == [("long", 0, 20)]  # a pass's worth, alone


def test_a_prompt_going_through_does_not_merge_the_plans_waves() -> None:
    """Two answers in the plan's two waves: each pass takes one of their steps while a third
    session's prompt goes through here too (it is not decoding); once its last rows have
    run here it decodes, and a wave takes two of the three."""
    s = schedule({"a": 5, "b": 5}, step_ms=4.0, row_ms=0.25)
    s.waves = (2,)
    s.add(frame("long", 0, 40), 0.0)
    assert take(s, 0.0) == [("long", 0, 16)]  # alone: no decode step is due yet
    s.add(frame("a", 5, 1), 0.01)
    s.add(frame("b", 5, 1), 0.01)
    assert take(s, 0.01) == [("a", 5, 1), ("long", 16, 16)]
    assert take(s, 0.02) == [("b", 5, 1), ("long", 32, 8)]
    s.add(frame("a", 6, 1), 0.03)
    s.add(frame("b", 6, 1), 0.03)
    assert take(s, 0.03) == [("a", 6, 1), ("b", 6, 1)]


def test_answers_whose_prompts_ran_here_count_in_the_waves_before_their_first_steps() -> None:
    """Four prompts asked together ran here in one pass; the first wave's two steps come
    back before the others': they go together, a wave of four answers over two waves."""
    s = schedule({}, step_ms=4.0, row_ms=0.25)
    s.waves = (2,)
    for i in range(4):
        s.add(frame(f"s{i}", 0, 3), 0.0)
    assert take(s, 0.0) == [(f"s{i}", 0, 3) for i in range(4)]
    s.add(frame("s0", 3, 1), 0.05)
    s.add(frame("s1", 3, 1), 0.05)
    assert take(s, 0.05) == [("s0", 3, 1), ("s1", 3, 1)]


def test_the_plans_waves_follow_how_many_answers_decode_here() -> None:
    """Waves by answers decoding (a host where 2 rows cost less than one): two answers ride
    as one wave, four as two of two."""
    s = schedule({"a": 5, "b": 5}, step_ms=4.0, row_ms=0.25)
    s.waves = (1, 1, 2)
    s.add(frame("a", 5, 1), 0.0)
    s.add(frame("b", 5, 1), 0.0)
    assert take(s, 0.0) == [("a", 5, 1), ("b", 5, 1)]
    s.shard.held.update(c=5, d=5)
    for session, start in (("a", 6), ("b", 6), ("c", 5), ("d", 5)):
        s.add(frame(session, start, 1), 0.01)
    assert take(s, 0.01) == [("a", 6, 1), ("b", 6, 1)]
    assert take(s, 0.02) == [("c", 5, 1), ("d", 5, 1)]


def test_a_batch_of_drafts_runs_no_more_positions_than_a_full_batch_of_steps() -> None:
    held = {f"s{i}": 10 for i in range(MAX_BATCH)}
    s = schedule(held)
    s.add(frame("s0", 10, 1, draft=MAX_BATCH), 0.0)
    s.add(frame("s1", 10, 1), 0.0)
    batch = s.take(0.0)
    assert isinstance(batch, list)
    assert [len(f.draft) for f in batch] == [MAX_BATCH // 2 - 1, 0]
    assert [f.tensor.shape[0] for f in batch] == [1 + len(batch[0].draft), 1]


def test_pass_costs_take_decode_passes_by_rows_and_price_prompt_rows_beside_them() -> None:
    costs = PassCosts()
    steps = [frame(f"s{i}", 4, 1) for i in range(3)]
    assert costs.record(steps, 30.0, split=False)
    assert (costs.step_ms, costs.pass_ms, costs.passes) == (30.0, {3: 30.0}, {3: 1})
    assert not costs.record([*steps, frame("p", 0, 20)], 50.0, split=False)
    assert costs.row_ms == pytest.approx(1.0)  # 20 ms more than the 3 steps, for 20 rows
    assert costs.took(steps, split=False) == 30.0
    assert costs.took(steps[:1], split=False) == 0.0  # a pass of one row: not timed yet
    assert costs.decode_ms(4) == pytest.approx(30.0 + 3 * 1.0)  # one step's pass, rows more
    # A split pass (the head scored apart) is measured apart, not as a decode pass.
    assert not costs.record(steps[:1], 20.0, split=True)
    assert (costs.split_ms, costs.split_steps, costs.step_ms) == ({1: 20.0}, 1, 30.0)
    assert costs.took(steps[:1], split=True) == 20.0
    moved = passes.moved(30.0, 40.0)
    costs.record(steps, 40.0, split=False)
    assert costs.pass_ms[3] == pytest.approx(moved)


def test_the_pace_a_stage_publishes_rides_out_one_held_pass_and_lets_the_first_go() -> None:
    """The schedule's averages follow the last few passes; the published pace's are each
    size's mean over its last PACE_PASSES."""
    costs = PassCosts()
    one, two = [frame("s0", 4, 1)], [frame(f"s{i}", 4, 1) for i in range(2)]
    costs.record(one, 50.0, split=False)  # a cold first pass
    for _ in range(passes.PACE_PASSES - 1):
        costs.record(one, 30.0, split=False)
    assert costs.paced_ms[1] == pytest.approx(30.0 + 20.0 / passes.PACE_PASSES)
    costs.record(one, 30.0, split=False)
    assert costs.paced_ms[1] == pytest.approx(30.0)  # the cold one let go
    costs.record(one, 90.0, split=False)  # held up by the host
    assert costs.paced_ms[1] < 32.0 < 36.0 < costs.pass_ms[1]
    for _ in range(passes.PACE_PASSES):  # the host slower for good
        costs.record(one, 36.0, split=False)
    assert costs.paced_ms[1] == pytest.approx(36.0)
    # Each size and kind its own.
    costs.record(two, 44.0, split=False)
    costs.record(one, 20.0, split=True)
    assert costs.paced_ms[2] == 44.0 and costs.paced_split_ms == {1: 20.0}


def test_a_waves_steps_without_their_head_price_the_slice_beside_them() -> None:
    """Where a wave's head goes to the first stage, its steps pass a last stage without it,
    beside a prompt's slice too: the slice's rows are priced against the steps' headless
    pass, such a pass is not one of the wave's own, nor short, and slices are cut to cost a
    share of the pass the steps run here."""
    costs = PassCosts()
    steps = [frame(f"s{i}", 4, 1) for i in range(2)]
    costs.record(steps, 60.0, split=False)  # a whole pass of the two, long before
    costs.record(steps, 40.0, split=True)  # the wave's passes since: without the head
    beside = [*steps, frame("p", 100, 8, sample=False)]
    assert not costs.record(beside, 80.0, split=True)
    assert costs.row_ms == pytest.approx(5.0)  # 40 ms more than the headless steps, 8 rows
    assert costs.split_ms == {2: 40.0} and costs.split_passes == {2: 1}
    assert costs.took(beside, split=True) == 0.0  # prompt rows in it: never on the loop
    assert costs.decode_ms(2) == 40.0  # what the two pass in here now


def test_a_slice_costs_what_the_decode_pass_beside_it_costs() -> None:
    """As timed for that count of steps, else one step's pass and a row's price a step more:
    a burst's later answers, whose counts are never timed alone, get slices their size."""
    s = schedule({})
    assert s.slice_rows(1.0, 3) is None  # nothing measured yet
    s.costs.step_ms, s.costs.row_ms = 4.0, 0.25
    assert [s.slice_rows(1.0, n) for n in (1, 3, 8)] == [16, 18, 23]
    s.costs.pass_ms[1] = 5.0  # one step's pass as timed, over the average of all
    assert s.slice_rows(1.0, 3) == 22
    assert s.slice_rows() == 16  # no count beside it: the decode passes' average
    s.costs.pass_ms[3] = 8.0
    assert s.slice_rows(1.0, 3) == 32
    assert s.slice_rows(0.5, 3) == 16


def test_a_rows_price_beside_decode_steps_is_read_only_beside_them() -> None:
    costs = PassCosts()
    steps = [frame(f"s{i}", 4, 1) for i in range(2)]
    costs.record(steps, 32.0, split=False)
    costs.record([frame("p", 0, 40, sample=False)], 124.0, split=False)  # alone: 2.3 ms a row
    assert costs.row_ms == pytest.approx(2.3) and costs.beside_ms == 0.0
    costs.record([*steps, frame("p", 40, 4, sample=False)], 64.0, split=False)
    assert costs.beside_ms == pytest.approx(8.0)  # 32 ms more than the two steps, 4 rows
    assert costs.row_ms == pytest.approx(passes.moved(2.3, 8.0))


def test_a_prompt_rows_price_is_read_only_against_decode_steps_timed_alone() -> None:
    price = passes.row_price
    timed = {1: 70.0, 4: 160.0}
    # 4 decode steps (160 ms alone) and 20 prompt rows in 200 ms: 2 ms a row.
    assert price(0.0, 200.0, 4, 20, timed, 70.0) == pytest.approx(2.0)
    # A prompt alone pays one decode pass's weights (step_ms) and its rows.
    assert price(0.0, 130.0, 0, 30, timed, 70.0) == pytest.approx(2.0)
    # Beside 6 steps, never timed alone: taking the 1-step pass (or step_ms) for theirs would
    # charge 4 rows with 5 more steps' work (200 - 70 = 130 ms: 32.5 ms a row, slices of 2).
    assert price(2.0, 200.0, 6, 4, timed, 70.0) == 2.0
    # A known count moves the price by STEP_WEIGHT of what this pass says.
    step = passes.STEP_WEIGHT
    assert price(2.0, 180.0, 4, 4, timed, 70.0) == pytest.approx(2.0 + step * (5.0 - 2.0))
