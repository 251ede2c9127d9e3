"""The model of N answers in flight through a chain that batches at each stage."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from meshshard.planner import Stage
from meshshard.planner.flow import (
    BATCHES,
    FlowStage,
    Overhead,
    Pace,
    Speculation,
    best_waves,
    flow_stages,
    latency_ms,
    tokens_per_s,
    waved,
    waves_by,
)
from meshshard.planner.instance import parse_instance


def linear(one: float, hop: float = 0.0) -> FlowStage:
    """A stage that gains nothing from batching: n sessions cost n steps."""
    return FlowStage(one, tuple(n * one for n in BATCHES), hop, 0.0)


def test_one_answer_goes_round_the_chain_once_per_token() -> None:
    stages = (linear(20.0), linear(30.0, hop=5.0))
    assert tokens_per_s(stages, 5.0, 1) == pytest.approx(1000 / 60)


def test_without_batching_gains_answers_started_apart_pipeline_to_the_papers_bottleneck() -> None:
    """Stages that gain nothing from batching do not hold waves together: answers started
    spread over a round stay spread, each stage busy while the others compute."""
    stages = (linear(20.0), linear(30.0, hop=5.0), linear(10.0, hop=5.0))
    rates = [tokens_per_s(stages, 5.0, n, together=False) for n in range(1, 17)]
    assert rates[1] == pytest.approx(2 * rates[0])  # the chain is far from full
    assert max(rates) == pytest.approx(1000 / 30, rel=0.01)  # the slowest stage, always busy
    assert all(r <= n * rates[0] * 1.001 for n, r in enumerate(rates, 1))


def test_sessions_spread_over_a_wave_a_stage_pipeline_to_the_papers_bottleneck() -> None:
    """A stage takes at most a wave's sessions: in a wave a stage, asked at once or spread,
    they do not travel as one train, stages taking turns, but overlap; where batching gains
    nothing that is always fastest."""
    stages = (linear(20.0), linear(30.0, hop=5.0), linear(10.0, hop=5.0))
    one_train = 16000 / (16 * 60 + 15)  # each stage taking all 16 at once: 16.4 tokens/s
    for together in (False, True):
        rate = tokens_per_s(stages, 5.0, 16, together=together, waves=3)
        assert rate == pytest.approx(1000 / 30, rel=0.03)
        assert rate > 1.9 * one_train
    assert tokens_per_s(stages, 5.0, 16, waves=1) == pytest.approx(one_train, rel=0.02)
    assert best_waves(stages, 5.0, 16) == 3


def test_answers_asked_at_once_spread_into_waves_held_together() -> None:
    """Their prompts share the first stage's pass; then, on two stages, two waves of four:
    the second stage holds each wave's first rows for the rest (batching pays there) and,
    the slower, is always busy with one wave or the other."""
    first = FlowStage(10.0, (10.5, 11.0, 11.5, 14.0, 20.0), 0.0, 0.0, overhead_ms=0.2)
    second = FlowStage(20.0, (21.0, 22.0, 23.0, 28.0, 40.0), 2.0, frame_ms=0.5)
    wave = first.pass_ms(4) + 4 * second.frame_ms + second.hop_ms + second.pass_ms(4) + 2.0
    assert wave < 2 * second.pass_ms(4)  # a wave comes round before the second stage is free
    assert tokens_per_s((first, second), 2.0, 8, waves=2) == pytest.approx(
        8000 / (2 * second.pass_ms(4)), rel=0.02
    )
    assert best_waves((first, second), 2.0, 8) == 2


def test_more_waves_only_where_they_model_faster() -> None:
    """Measured on a CPU (SmolLM2, 2 stages): 4 rows cost 0.8 of 8, so two waves keep the
    slower stage busier than one wave's whole round: one wave."""
    first = FlowStage(17.0, (24.0, 27.0, 30.0, 38.0, 70.0), 0.0, 0.0)
    second = FlowStage(35.0, (50.0, 60.0, 70.0, 88.0, 160.0), 0.5, 0.0)
    one, two = (tokens_per_s((first, second), 0.5, 8, waves=w) for w in (1, 2))
    assert one > two
    assert best_waves((first, second), 0.5, 8) == 1
    assert best_waves((first, second), 0.5, 1) == 1


def test_a_waves_head_at_the_first_stage_moves_its_cost_there_in_any_count_of_waves() -> None:
    """lan-3's stages as the forty-second session's profiles priced them: the desk's layers,
    the laptop's half core with the head, passes of 4 rows costing far more than of 3. The
    head moved to the desk shortens the laptop's passes and lengthens the desk's: in one
    wave the round is shorter by the difference; in two the desk's time to spare takes it,
    so two waves balance the stages and go round fastest, where without the move the
    laptop's head kept one wave fastest."""
    desk = FlowStage(27.6, (30.3, 32.4, 44.0, 54.7, 76.5), 0.0, 0.0)
    laptop = FlowStage(66.1, (69.5, 76.3, 109.4, 129.7, 188.9), 0.85, 0.0)
    cut, added = (18.0, 19.8, 31.0, 34.3, 55.0), (8.2, 9.2, 13.3, 15.6, 19.2)
    plain = (desk, laptop)
    moved = waved(plain, cut, added)
    assert moved[0].batch_ms[3] == pytest.approx(54.7 + 15.6) and moved[0].one_ms == 27.6
    assert moved[1].batch_ms[3] == pytest.approx(129.7 - 34.3) and moved[1].one_ms == 66.1
    assert waved(plain, (0.0,) * 5, (0.0,) * 5) == plain
    one_wave = (tokens_per_s(s, 0.85, 8) for s in (plain, moved))
    assert next(one_wave) < next(one_wave)
    assert best_waves(plain, 0.85, 8) == 1
    assert best_waves(moved, 0.85, 8) == 2
    assert tokens_per_s(moved, 0.85, 8, waves=2) > 1.04 * tokens_per_s(moved, 0.85, 8)
    # 4 answers: two waves of two rows, where a pass of 4 costs the laptop 1.4 of one of 3
    best_plain = max(tokens_per_s(plain, 0.85, 4, waves=w) for w in (1, 2))
    assert best_waves(moved, 0.85, 4) == 2
    assert tokens_per_s(moved, 0.85, 4, waves=2) > 1.25 * best_plain
    assert waves_by(moved, 0.85, 8) == (1, 1, 1, 2)


def test_waves_by_answers_decoding_where_two_rows_cost_less_than_one() -> None:
    """A host whose BLAS runs one row's products slower than two rows' (the thirty-seventh
    session's: 2 rows 0.75 of one): 2 answers go round fastest as one wave, a pass of both
    at each stage in turn; 4 and 8 as two waves, each stage busy with one or the other."""
    stage = FlowStage(30.0, (22.0, 33.0, 32.0, 50.0, 90.0), 0.5, 0.0)
    by = waves_by((stage, stage), 0.5, 8)
    assert by == (1, 1, 2)
    for n, waves in ((2, 1), (4, 2), (8, 2)):
        fastest = max(tokens_per_s((stage, stage), 0.5, n, waves=w) for w in (1, 2))
        assert tokens_per_s((stage, stage), 0.5, n, waves=by) == fastest
        assert tokens_per_s((stage, stage), 0.5, n, waves=waves) == fastest


def test_waves_by_count_rise_with_the_answers_to_the_plans_count() -> None:
    """A burst's answers join a few at a time, and waves apart do not join, so more answers
    never ride in fewer waves; and the plan's 8 answers keep their own count: where the
    model finds 7 answers fastest in 3 waves and 8 in 2, 7 ride in 2."""
    stages = (
        FlowStage(5.0, (4.0, 6.0, 5.5, 9.0, 16.0), 0.0, 0.0, overhead_ms=0.3),
        FlowStage(25.0, (19.0, 28.0, 27.0, 44.0, 77.0), 0.6, 0.0, overhead_ms=0.3),
        FlowStage(20.0, (15.0, 22.0, 21.0, 36.0, 62.0), 0.6, 0.0, overhead_ms=0.3),
    )
    alone = [best_waves(stages, 0.6, n) for n in range(1, 9)]
    assert alone[6:] == [3, 2]
    by = waves_by(stages, 0.6, 8)
    assert by == (1, 1, 2) and all(a <= b for a, b in itertools.pairwise(by))


def test_a_stage_that_batches_well_carries_more_than_one_step_at_a_time() -> None:
    cheap = FlowStage(30.0, (33.0, 35.0, 36.0, 42.0, 54.0), 5.0, 0.0)  # 4 sessions: 1.2 steps
    stages = (linear(5.0), cheap)
    assert tokens_per_s(stages, 5.0, 16) > 2 * 1000 / 30


def test_frames_share_their_link() -> None:
    slow = FlowStage(1.0, BATCHES, 1.0, frame_ms=20.0)  # 20 ms on the wire per frame
    assert tokens_per_s((linear(1.0), slow), 1.0, 8) == pytest.approx(1000 / 20, rel=0.02)


def test_a_batch_costs_what_was_measured_for_its_size_and_between_sizes_lies_on_a_line() -> None:
    # Measured as math libraries behave: 2 and 3 rows cost as much as separate steps, 4 rows
    # take a faster kernel.
    stage = FlowStage(10.0, (20.0, 30.0, 14.0, 20.0, 32.0), 0.0, 0.0)
    assert [stage.step_ms(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 30.0, 14.0]
    assert stage.step_ms(6) == pytest.approx(17.0)
    assert stage.step_ms(32) == pytest.approx(64.0)  # past the largest size: in proportion


def test_flow_stages_read_the_plan_its_links_and_the_batched_profile() -> None:
    inst = parse_instance(
        {
            "units": [{"name": f"u{i}", "mem": 1, "out_bytes": 1000} for i in range(4)],
            "devices": [
                {"name": "a", "mem": 10, "ms": [1, 2, 3, 4]},
                {"name": "b", "mem": 10, "ms": [2, 4, 6, 8]},
            ],
            "links": {"default": {"mbps": 8, "ms": 3}},
            "source": "a",
            "return_bytes": 4,
        }
    )
    per_size = [[1.0, 1.0, 7.0 + n, 9.0] for n in BATCHES]
    stages, back = flow_stages(
        inst, [Stage("a", 0, 2), Stage("b", 2, 4)], {"b": per_size}, {"a": Overhead(0.5, 2.0)}
    )
    # No batched timings: no gain from batching.
    assert stages[0] == FlowStage(
        3.0, linear(3.0).batch_ms, 0.0, 0.0, overhead_ms=0.5, pass_overhead_ms=2.0
    )
    # 1000 bytes at 8 Mbit/s: 1 ms on the wire.
    assert stages[1] == FlowStage(14.0, tuple(16.0 + n for n in BATCHES), 3.0, 1.0)
    assert back == pytest.approx(3.004)
    # Measured serving at 1.5 the profile's time: every pass takes that much longer.
    paced, _ = flow_stages(
        inst, [Stage("a", 0, 2), Stage("b", 2, 4)], {"b": per_size}, {}, pace={"b": Pace(1.5, 1.5)}
    )
    assert paced[0].one_ms == 3.0
    assert paced[1].one_ms == 21.0 and paced[1].batch_ms == tuple(24.0 + 1.5 * n for n in BATCHES)
    # One row's passes at 0.8 of their price, several rows' at theirs (none ran yet): each
    # size by its own.
    apart, _ = flow_stages(
        inst, [Stage("a", 0, 2), Stage("b", 2, 4)], {"b": per_size}, {}, pace={"b": Pace(0.8)}
    )
    assert apart[1].one_ms == pytest.approx(14.0 * 0.8)
    assert apart[1].batch_ms == stages[1].batch_ms


def test_per_session_work_runs_while_a_stage_waits_and_lengthens_only_a_busy_stage() -> None:
    """A stage does a step's work beyond its pass (frames, sealing, sampling) while the
    others compute: one answer's round pays only for what does not fit there, a stage
    always busy pays for all of it."""
    fits = (linear(10.0), FlowStage(30.0, linear(30.0).batch_ms, 1.0, 0.0, overhead_ms=3.0))
    assert latency_ms(fits, 1.0) == pytest.approx(10 + 30 + 1 + 1)
    assert tokens_per_s(fits, 1.0, 1) == pytest.approx(1000 / 42)
    # 12 ms a round to wait in, 15 of work: 3 ms late.
    late = (linear(10.0), FlowStage(30.0, linear(30.0).batch_ms, 1.0, 0.0, overhead_ms=15.0))
    assert latency_ms(late, 1.0) == pytest.approx(42 + 3)
    # 8 answers keep the second stage busy (no gain from batching): its work is on the way.
    assert tokens_per_s(fits, 1.0, 8, together=False) == pytest.approx(1000 / 33, rel=0.02)


def test_a_pass_s_own_work_is_shared_by_its_rows() -> None:
    """Work that comes once a pass, whatever its rows, costs a lone step what it costs;
    8 answers in two waves keep both stages busy, and there each row pays an eighth of it.
    Priced per step instead, as the meter did before it told the two apart, the same lone
    cost makes 8 answers slower."""
    compute = (linear(20.0), linear(20.0, hop=1.0))
    per_pass = tuple(replace(s, pass_overhead_ms=4.0) for s in compute)
    per_step = tuple(replace(s, overhead_ms=4.0) for s in compute)
    assert latency_ms(per_pass, 1.0) == latency_ms(per_step, 1.0)
    bare = tokens_per_s(compute, 1.0, 8, waves=2)
    shared = tokens_per_s(per_pass, 1.0, 8, waves=2)
    each = tokens_per_s(per_step, 1.0, 8, waves=2)
    assert each < shared < bare
    # Both stages always busy: a round of two waves of 4 rows is two passes a stage.
    four = per_pass[0].pass_ms(4)
    assert shared == pytest.approx(8000 / (2 * (four + 4.0)), rel=0.03)
    assert each == pytest.approx(8000 / (2 * (four + 4 * 4.0)), rel=0.03)


def test_a_flow_needs_sessions() -> None:
    with pytest.raises(ValueError):
        tokens_per_s((linear(1.0),), 0.0, 0)


def test_a_speculative_pass_costs_its_positions_and_yields_its_tokens() -> None:
    """Where hops dominate, a pass of 5 positions costs little more than one of 1, and 3
    tokens per pass nearly triple the rate; on stages that pay for every position (no gain
    from batching, no hops), the same pass is a loss."""
    gpu = FlowStage(10.0, (10.5, 11.0, 11.5, 13.0, 16.0), 40.0, 0.1)  # rows almost free
    hops = (gpu, gpu, gpu)
    spec = Speculation(positions=5.0, tokens=3.0)
    plain, drafted = tokens_per_s(hops, 40.0, 1), tokens_per_s(hops, 40.0, 1, spec=spec)
    assert 2.5 < drafted / plain < 3.0
    assert latency_ms(hops, 40.0, spec) == pytest.approx(1000 / drafted)
    cpu = (linear(20.0), linear(20.0))
    assert tokens_per_s(cpu, 0.0, 1, spec=spec) == pytest.approx(0.6 * tokens_per_s(cpu, 0.0, 1))
    # With many answers in flight the extra positions compete for the same stages.
    assert tokens_per_s(cpu, 0.0, 8, spec=spec) < tokens_per_s(cpu, 0.0, 8)
    assert tokens_per_s(hops, 40.0, 8, spec=spec) > 1.5 * tokens_per_s(hops, 40.0, 8)


def test_a_speculative_pass_sends_each_position_s_activations() -> None:
    slow = FlowStage(1.0, BATCHES, 1.0, frame_ms=20.0)
    spec = Speculation(positions=4.0, tokens=2.0)
    # The link carries 4 frames' worth per pass and the pass yields 2 tokens: half the rate.
    assert tokens_per_s((linear(1.0), slow), 1.0, 8, spec=spec) == pytest.approx(
        1000 / 40, rel=0.02
    )


@pytest.mark.parametrize("positions, tokens", [(1.0, 2.0), (3.0, 0.5)])
def test_a_pass_yields_between_one_token_and_its_positions(positions: float, tokens: float) -> None:
    with pytest.raises(ValueError, match="yields 1 to"):
        Speculation(positions, tokens)
