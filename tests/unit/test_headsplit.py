"""A split head: the share the planner gives the first stage, the two picks matched, and a
shard's pick over rows equal to the whole head's best; and when a wave's head goes whole to
the first stage, and what that takes off its round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshshard.chain.picks import MOST_WAITING, Pick, Picks, better, split_rows
from meshshard.chain.speculate import accepted
from meshshard.chain.tensors import to_wire
from meshshard.model.shard import Shard
from meshshard.planner import Instance, Stage
from meshshard.planner.flow import (
    Pace,
    Speculation,
    alone,
    flow_stages,
    latency_ms,
    tokens_per_s,
    waved,
)
from meshshard.planner.headsplit import (
    head_saving_ms,
    head_share,
    wave_head,
    wave_head_ms,
    wave_saving_ms,
)
from meshshard.planner.instance import Device, Link, Unit
from meshshard.types import Epoch
from meshshard.wire import PickFrame, Sampling, StepFrame

HIDDEN_BYTES = 2304.0  # SmolLM2's hidden state, float32


def chain(head_a: float, head_c: float, link: Link) -> Instance:
    """Embedding, two layers and a head, a unit each on devices a, b, c."""
    units = (Unit("E", 1, HIDDEN_BYTES), Unit("L1", 1, HIDDEN_BYTES), Unit("L2", 1, HIDDEN_BYTES))
    units += (Unit("H", 1, 4.0),)
    devices = tuple(
        Device(n, 4, (0.1, 5.0, 5.0, h)) for n, h in (("a", head_a), ("b", 9), ("c", head_c))
    )
    return Instance(units, devices, link, (), "a")


STAGES = [Stage("a", 0, 2), Stage("b", 2, 3), Stage("c", 3, 4)]
LOOPBACK = Link(5000, 0.2)


def test_equal_ends_on_a_fast_link_split_the_head_in_about_half() -> None:
    share = head_share(chain(8.6, 8.6, LOOPBACK), STAGES)
    assert 0.45 < share <= 0.5  # the hidden state's trip comes off the first stage's share


def test_a_slower_first_device_takes_less_and_a_faster_more() -> None:
    slow = head_share(chain(20.0, 8.6, LOOPBACK), STAGES)
    fast = head_share(chain(4.0, 8.6, LOOPBACK), STAGES)
    assert 0 < slow < 0.35 < 0.6 < fast


def test_a_hops_delay_is_paid_either_way_the_hidden_states_bytes_are_not() -> None:
    # The token's hop, unsplit, costs the delay the pick's does; the hidden state's bytes
    # are what the split adds: 1.8 ms at 10 Mbit/s still pays, 18 ms at 1 does not.
    assert 0.35 < head_share(chain(8.6, 8.6, Link(10, 3.0)), STAGES) < 0.45
    assert head_share(chain(8.6, 8.6, Link(5000, 5.0)), STAGES) > 0.45
    assert head_share(chain(8.6, 8.6, Link(1, 3.0)), STAGES) == 0.0


def test_no_split_where_it_saves_little_or_the_ends_are_one_device() -> None:
    assert head_share(chain(8.6, 0.2, LOOPBACK), STAGES) == 0.0  # a head that costs little
    one = [Stage("a", 0, 4)]
    assert head_share(chain(8.6, 8.6, LOOPBACK), one) == 0.0
    ring = [Stage("a", 0, 2), Stage("b", 2, 3), Stage("a", 3, 4)]
    assert head_share(chain(8.6, 8.6, LOOPBACK), ring) == 0.0


def test_pace_scales_the_profiles_head_times() -> None:
    inst = chain(8.6, 8.6, LOOPBACK)
    assert (
        head_share(inst, STAGES, {"a": Pace(2.0)})
        < head_share(inst, STAGES)
        < head_share(inst, STAGES, {"c": Pace(2.0)})
    )
    # A lone answer's one-row head: the pace of several rows' passes does not move it.
    assert head_share(inst, STAGES, {"a": Pace(several=2.0)}) == head_share(inst, STAGES)


def test_split_rows_are_whole_blocks_of_a_large_vocabulary() -> None:
    assert split_rows(0.5, 49152) == 24576
    assert split_rows(0.47, 49152) % 128 == 0
    assert split_rows(0.0, 49152) == 0
    assert split_rows(0.001, 49152) == 0  # under a block: none
    assert split_rows(0.5, 96) == 48  # a tiny model's, at 16 rows
    assert split_rows(0.4, 96) == 32


def pick(logit: float, token: int) -> Pick:
    return Pick((logit,), (token,))


def test_the_better_pick_is_the_higher_logit_and_of_equal_ones_the_lower_id() -> None:
    assert better(pick(2.0, 10), pick(3.0, 900)) == (900,)
    assert better(pick(3.0, 10), pick(3.0, 900)) == (10,)
    assert better(pick(3.0, 900), pick(3.0, 10)) == (10,)
    # Row by row, for a pass that verified a draft.
    ours, theirs = Pick((2.0, 5.0, 1.0), (10, 11, 12)), Pick((3.0, 4.0, 1.0), (900, 901, 902))
    assert better(ours, theirs) == better(theirs, ours) == (900, 11, 12)


def test_a_passs_picks_give_the_tokens_its_draft_confirms() -> None:
    assert accepted((7,), ()) == (7,)
    assert accepted((4, 5, 9), (4, 5)) == (4, 5, 9)  # the whole draft, and the next
    assert accepted((4, 8, 9), (4, 5)) == (4, 8)  # the first that differs ends them
    assert accepted((3, 5, 6), (4, 5)) == (3,)


E = Epoch(2, "c")


def split_step(session: str, step: int, attempt: int = 0) -> StepFrame:
    hidden = to_wire(torch.zeros(1, 4))
    return StepFrame(
        E, session, step, step + 5, hidden, "127.0.0.1:1", True, Sampling(0, 1, 0), attempt,
        loop="127.0.0.1:2", until=64, head=48,
    )  # fmt: skip


def test_picks_meet_whichever_half_comes_first_by_session_step_and_attempt() -> None:
    picks = Picks()
    assert picks.ours(split_step("s", 3), pick(1.0, 7)) is None
    assert picks.theirs(PickFrame(E, "s", 3, (60,), (0.5,), attempt=1)) is None  # another try
    got = picks.theirs(PickFrame(E, "s", 3, (60,), (2.5,)))
    assert got is not None and got[1] == (60,) and got[0].step == 3
    assert picks.theirs(PickFrame(E, "t", 4, (61,), (0.5,))) is None
    assert picks.ours(split_step("t", 4), pick(1.0, 8)) == (8,)
    assert len(picks) == 1  # attempt 1's pick, until its session is forgotten
    picks.forget("s")
    assert len(picks) == 0


def test_halves_whose_other_half_never_comes_do_not_pile_up() -> None:
    picks = Picks()
    for i in range(MOST_WAITING + 50):
        picks.theirs(PickFrame(E, f"s{i}", 1, (60,), (0.5,)))
        picks.ours(split_step(f"t{i}", 1), pick(1.0, 7))
    assert len(picks) == 2 * MOST_WAITING
    assert picks.ours(split_step("s0", 1), pick(1.0, 7)) is None  # the oldest went first


@pytest.fixture(scope="module")
def ends(tiny_llama: Path) -> tuple[Shard, Shard]:
    return Shard.load(tiny_llama, 0, 2), Shard.load(tiny_llama, 2, 6)


def test_two_picks_over_the_rows_give_the_whole_heads_tokens_and_logits(
    ends: tuple[Shard, Shard],
) -> None:
    """A pass's row for its token, and one for each drafted token where it verifies a
    draft: each row's two picks give the whole head's best and its logit there."""
    first, last = ends
    vocab = last.spec.vocab_size
    torch.manual_seed(3)
    for i in range(24):
        x = torch.randint(0, vocab, (4 + i,))
        h = first.prefill(f"s{i}", x)
        read = 1 + i % 6  # the last token's row and up to 5 drafted ones
        whole = last.prefill(f"w{i}", h.clone(), logits=read).reshape(read, vocab)
        normed = last.prefill(f"h{i}", h.clone(), logits=read, head=False)
        assert normed.shape == (read, last.spec.hidden_size)
        for rows in (16, 32, vocab // 2, vocab - 16):
            ours, theirs = first.pick(normed, 0, rows), last.pick(normed, rows, vocab)
            assert better(Pick(*ours), Pick(*theirs)) == tuple(whole.argmax(dim=-1).tolist())
            for logits, tokens in (ours, theirs):
                assert list(logits) == [float(whole[j, t]) for j, t in enumerate(tokens)]


def test_a_middle_shard_holds_no_head_to_pick_from(tiny_llama: Path) -> None:
    middle = Shard.load(tiny_llama, 2, 4)
    assert middle.head_weight is None
    with pytest.raises(ValueError, match="no head matrix"):
        middle.pick(torch.zeros(1, middle.spec.hidden_size), 0, 8)


def test_a_lone_answers_round_is_shorter_by_what_the_split_saves() -> None:
    inst = chain(8.6, 8.6, LOOPBACK)
    saving = head_saving_ms(inst, STAGES)
    assert 4.0 < saving[0] < 4.4  # half the head, less the hidden state's bytes
    assert not any(head_saving_ms(chain(8.6, 8.6, Link(1, 3.0)), STAGES))  # no split
    flow, back = flow_stages(inst, STAGES, {}, {})
    lone = alone(flow, saving)
    assert lone[:-1] == flow[:-1]
    assert latency_ms(lone, back) == pytest.approx(latency_ms(flow, back) - saving[0])
    assert tokens_per_s(lone, back, 1) > tokens_per_s(flow, back, 1)
    assert alone(flow, (0.0,) * len(saving)) == flow


def test_a_lone_answer_is_priced_at_the_share_its_stages_run() -> None:
    # The plan's share was chosen on the paces of its day; the stages keep it until the
    # next plan, so the prediction prices that share, not the best one now.
    inst = chain(8.6, 8.6, LOOPBACK)
    best = head_share(inst, STAGES)
    assert head_saving_ms(inst, STAGES, share=best) == head_saving_ms(inst, STAGES)
    kept = head_saving_ms(inst, STAGES, share=0.2)
    assert 0 < kept[0] < head_saving_ms(inst, STAGES)[0]
    assert kept[0] == pytest.approx(0.2 * 8.6)  # the last stage still scores 0.8 of it
    assert not any(head_saving_ms(inst, STAGES, share=0.0))


def test_a_pass_verifying_a_draft_saves_by_its_rows_heads() -> None:
    # Heads timed by rows as a profile times them: 4 rows for the price of 2, 8 of 3.
    inst = chain(8.6, 8.6, LOOPBACK)
    timed = {d: [[0.1, 5, 5, 8.6 * k] for k in (1.5, 1.8, 2.0, 3.0, 5.0)] for d in "ac"}
    saving = head_saving_ms(inst, STAGES, batch_ms=timed)
    assert saving[3] == pytest.approx(2 * saving[0], rel=0.05)  # BATCHES[2]: 4 rows
    assert saving[4] > saving[3]  # 8 rows
    untimed = head_saving_ms(inst, STAGES)  # a head of k rows costs k heads
    assert untimed[3] == pytest.approx(4 * untimed[0], rel=0.05)
    short = {d: [[8.6]] * 5 for d in "ac"}  # timings not of the profile's units: not used
    assert head_saving_ms(inst, STAGES, batch_ms=short) == untimed
    # A long draft's hidden states on a slow link cost more than the share saves.
    slow = head_saving_ms(chain(8.6, 8.6, Link(10, 3.0)), STAGES, batch_ms=timed)
    assert slow[0] > 0 > slow[-1]
    flow, back = flow_stages(inst, STAGES, timed, {})
    lone = alone(flow, saving)
    spec = Speculation(positions=4.0, tokens=2.5)
    whole, split = latency_ms(flow, back, spec), latency_ms(lone, back, spec)
    assert whole - split == pytest.approx(saving[3] / spec.tokens)


def test_a_wave_goes_to_a_first_stage_faster_at_the_head_and_not_elsewhere() -> None:
    # Heads timed by rows: 8 rows cost 3 of one. A first device twice as fast at it takes
    # a wave's head; one as fast, or slower, does not (the rows' trip costs more there).
    timed = {
        d: [[0.1, 5, 5, h * k] for k in (1.5, 1.8, 2.0, 3.0, 5.0)]
        for d, h in (("a", 4.0), ("c", 8.0))
    }
    fast = chain(4.0, 8.0, LOOPBACK)
    saving = wave_saving_ms(fast, STAGES, batch_ms=timed)
    assert saving[3] == pytest.approx(3 * 8.0 - 3 * 4.0, abs=0.2)  # BATCHES[3]: 8 rows
    assert wave_head(fast, STAGES, 8, batch_ms=timed)
    assert not wave_head(fast, STAGES, 1, batch_ms=timed)  # a lone answer splits its own
    assert not wave_head(chain(8.0, 8.0, LOOPBACK), STAGES, 8)
    assert not wave_head(chain(16.0, 8.0, LOOPBACK), STAGES, 8)
    assert not wave_head(fast, STAGES, 8, {"a": Pace(several=2.0)}, timed)  # a's busy hour
    # 8 rows of hidden states at 1 Mbit/s cost 150 ms where 8 tokens cost a fraction of it.
    assert not wave_head(chain(4.0, 8.0, Link(1, 3.0)), STAGES, 8, batch_ms=timed)
    ring = [Stage("a", 0, 2), Stage("b", 2, 3), Stage("a", 3, 4)]
    assert not any(wave_saving_ms(fast, ring)) and not wave_head(fast, ring, 8)


def test_a_waves_round_is_shorter_by_what_its_head_at_the_first_stage_saves() -> None:
    inst = chain(4.0, 8.0, LOOPBACK)
    saving = wave_saving_ms(inst, STAGES)
    cut, added = wave_head_ms(inst, STAGES)
    assert saving == tuple(c - a for c, a in zip(cut, added, strict=True))
    flow, back = flow_stages(inst, STAGES, {}, {})
    waves = waved(flow, cut, added)
    assert waves[1:-1] == flow[1:-1] and waves[-1].one_ms == flow[-1].one_ms  # a lone answer's
    assert waves[0].one_ms == flow[0].one_ms
    assert waves[-1].batch_ms[3] == pytest.approx(flow[-1].batch_ms[3] - cut[3])
    assert waves[0].batch_ms[3] == pytest.approx(flow[0].batch_ms[3] + added[3])
    # A pass of each stage in turn, as one wave runs: shorter by the difference.
    whole = sum(s.batch_ms[3] for s in flow) - sum(s.batch_ms[3] for s in waves)
    assert whole == pytest.approx(saving[3])
    # These stages gain nothing from batching, so their answers spread out round the chain,
    # and the first stage, taking on the head, gives back part of what the last sheds.
    assert tokens_per_s(waves, back, 8) > tokens_per_s(flow, back, 8)
    assert tokens_per_s(waves, back, 1) == tokens_per_s(flow, back, 1)
    assert waved(flow, (0.0,) * len(cut), (0.0,) * len(cut)) == flow
