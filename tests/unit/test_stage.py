"""A stage's batching with real (tiny) shards: sessions verifying drafts of different lengths
share one forward pass, and each gets the tokens its own pass would have given."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from meshshard.chain import schedule as schedule_module
from meshshard.chain import stage as stage_module
from meshshard.chain.speculate import confirmed
from meshshard.chain.stage import StageWorker
from meshshard.chain.tensors import from_wire, to_wire
from meshshard.model.batching import MAX_BATCH
from meshshard.model.generate import LocalChain, generate
from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import Shard, load_spec
from meshshard.types import Epoch
from meshshard.wire import DataFrame, ErrorCode, ErrorFrame, Sampling, StepFrame, TokenFrame

PROMPTS = [[5, 17, 3, 42, 8], [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
EPOCH = Epoch(1, "a")
GREEDY = Sampling(temperature=0.0, top_p=1.0, seed=0)


def step(session: str, start: int, ids: list[int], draft: tuple[int, ...]) -> StepFrame:
    tensor = to_wire(torch.tensor([*ids, *draft]))
    return StepFrame(EPOCH, session, 0, start, tensor, "origin", True, GREEDY, draft=draft)


def alone(model: Path, prompt: list[int], frame: StepFrame) -> tuple[int, ...]:
    """The tokens one pass of this frame gives on a shard that runs nothing else."""
    shard = Shard.load(model, 0, load_spec(model).num_units)
    shard.prefill("s", torch.tensor(prompt))
    ids = from_wire(frame.tensor)
    logits = shard.prefill("s", ids, logits=ids.shape[0])
    return confirmed(Sampler(SamplingParams()), logits, frame.draft, frame.step)


def greedy(model: Path, prompt: list[int], n: int) -> tuple[int, ...]:
    chain = LocalChain.load(model, ())
    return tuple(generate(chain, prompt, n))


async def run(
    worker: StageWorker, frames: list[StepFrame], sent: Sized, answers: int | None = None
) -> None:
    """Run `frames`, queued before the worker starts so that they wait together, until
    `answers` have been sent (one per frame unless told)."""
    for frame in frames:
        await worker.put(frame)
    task = asyncio.create_task(worker.run())
    try:
        while len(sent) < (len(frames) if answers is None else answers):
            await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_drafts_of_different_lengths_are_verified_in_one_pass(tiny_model: Path) -> None:
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    sent: list[tuple[str, DataFrame]] = []

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append((addr, frame))

    worker = StageWorker(shard, EPOCH, None, send)
    # One draft is what the model itself says next (confirmed whole), one is a guess.
    truth = greedy(tiny_model, [*PROMPTS[1], PROMPTS[1][0]], 3)
    drafts: list[tuple[int, ...]] = [(), truth, (1, 2)]
    frames = [
        step(f"s{i}", len(p), [p[0]], d)
        for i, (p, d) in enumerate(zip(PROMPTS, drafts, strict=True))
    ]
    await run(worker, frames, sent)
    assert worker.batches == 1  # three sessions, three lengths, one forward pass
    assert all(isinstance(f, TokenFrame) for _, f in sent)
    got = {f.session: f.tokens for _, f in sent if isinstance(f, TokenFrame)}
    for i, (prompt, frame) in enumerate(zip(PROMPTS, frames, strict=True)):
        assert got[f"s{i}"] == alone(tiny_model, prompt, frame)
    assert got["s1"][:3] == truth and len(got["s1"]) == 4


async def test_a_full_batch_cuts_drafts_to_its_positions(tiny_model: Path) -> None:
    """Every row of a pass pays for the longest: in a batch of B sessions a draft keeps at
    most MAX_BATCH / B - 1 tokens, and the tokens returned are what the cut draft gives."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    sessions = 8
    for i in range(sessions):
        shard.prefill(f"s{i}", torch.tensor(PROMPTS[0]))
    sent: list[TokenFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        sent.append(frame)

    worker = StageWorker(shard, EPOCH, None, send)
    long_draft = tuple(range(10, 20))
    frames = [step(f"s{i}", len(PROMPTS[0]), [3], long_draft) for i in range(sessions)]
    await run(worker, frames, sent)
    assert worker.batches == 1
    most = MAX_BATCH // sessions - 1
    cut = step("s", len(PROMPTS[0]), [3], long_draft[:most])
    assert all(f.tokens == alone(tiny_model, PROMPTS[0], cut) for f in sent)
    assert all(len(f.tokens) <= most + 1 for f in sent)


async def test_decoding_goes_between_the_slices_of_a_long_prompt(tiny_model: Path) -> None:
    """A prompt queued ahead of other sessions' decode steps does not hold them until it is
    all through: it is cut into slices, and the decode steps run in one pass with the first
    (packed beside them, no padding). Every session gets the token it would get alone."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    order: list[str] = []
    got: dict[str, tuple[int, ...]] = {}

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        order.append(frame.session)
        got[frame.session] = frame.tokens

    sizes: list[int] = []
    worker = StageWorker(shard, EPOCH, None, send, lambda n, _s, _d: sizes.append(n))
    worker.costs.step_ms, worker.costs.row_ms = 2.0, 0.1  # as measured: a slice of 20 rows
    long = [(7 * i) % 50 + 1 for i in range(70)]
    frames = [step("long", 0, long, ())]
    frames += [step(f"s{i}", len(p), [p[0]], ()) for i, p in enumerate(PROMPTS)]
    await run(worker, frames, order)
    assert sizes[0] == 4  # the three decode steps and the prompt's first slice
    assert len(sizes) >= 3  # the rest of the prompt in more slices
    assert order == ["s0", "s1", "s2", "long"]  # the decode steps did not wait for it all
    assert got["long"] == greedy(tiny_model, long, 1)
    for i, (prompt, frame) in enumerate(zip(PROMPTS, frames[1:], strict=True)):
        assert got[f"s{i}"] == alone(tiny_model, prompt, frame)


@pytest.mark.parametrize(("long_prompt", "rows"), [(256, 18), (30, 9)])
async def test_a_slice_beside_decode_steps_costs_a_decode_pass_or_half_in_a_long_prompt(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, long_prompt: int, rows: int
) -> None:
    """Where a prompt row costs a sixteenth of a one-step decode pass (a slow stage late in a
    long prompt), the slice beside the three decode steps holds 18 rows, what their pass costs
    (4 ms, and a row's 0.25 for each step more), not a pass of prompts' least (the steps pay
    for the weights, the rows are all the slice adds); half that once the prompt reaches past
    LONG_PROMPT positions (at a row's price beside decode steps, here the same)."""
    monkeypatch.setattr(schedule_module, "LONG_PROMPT", long_prompt)
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    got: dict[str, tuple[int, ...]] = {}

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        got[frame.session] = frame.tokens

    held: list[int] = []  # the long prompt's rows in the cache after each pass

    def observe(_n: int, _s: float, _d: bool) -> None:
        held.append(shard.cache_length("long") if "long" in shard.sessions else 0)

    worker = StageWorker(shard, EPOCH, None, send, observe)
    worker.costs.step_ms, worker.costs.row_ms = 4.0, 0.25
    worker.costs.beside_ms = 0.25
    long = [(7 * i) % 50 + 1 for i in range(40)]
    frames = [step("long", 0, long, ())]
    frames += [step(f"s{i}", len(p), [p[0]], ()) for i, p in enumerate(PROMPTS)]
    await run(worker, frames, got)
    assert held[0] == rows
    assert got["long"] == greedy(tiny_model, long, 1)


async def test_the_next_batch_runs_while_the_last_is_sent(tiny_model: Path) -> None:
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS[:2]):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    release = asyncio.Event()
    sent: list[DataFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        await release.wait()  # a slow link
        sent.append(frame)

    worker = StageWorker(shard, EPOCH, "next:1", send)
    task = asyncio.create_task(worker.run())
    try:
        await worker.put(step("s0", len(PROMPTS[0]), [3], ()))
        while worker.batches < 1:
            await asyncio.sleep(0.01)
        await worker.put(step("s1", len(PROMPTS[1]), [4], ()))
        while worker.batches < 2:  # hangs if the worker waits for its first send
            await asyncio.sleep(0.01)
        assert not sent
        release.set()
        while len(sent) < 2:
            await asyncio.sleep(0.01)
        assert [f.session for f in sent if isinstance(f, StepFrame)] == ["s0", "s1"]
    finally:
        release.set()
        await worker.close("done")
        await task


async def test_greedy_and_seeded_steps_in_one_batch_sample_as_alone(tiny_model: Path) -> None:
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS[:2]):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    got: dict[str, tuple[int, ...]] = {}

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        got[frame.session] = frame.tokens

    seeded = Sampling(temperature=1.5, top_p=1.0, seed=7)
    frames = [
        step("s0", len(PROMPTS[0]), [3], (9, 9)),
        replace(step("s1", len(PROMPTS[1]), [4], ()), sampling=seeded, step=5),
    ]
    await run(StageWorker(shard, EPOCH, None, send), frames, got)
    assert got["s0"] == alone(tiny_model, PROMPTS[0], frames[0])
    reference = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    reference.prefill("s", torch.tensor(PROMPTS[1]))
    logits = reference.prefill("s", torch.tensor([4]))
    sampler = Sampler(SamplingParams(temperature=1.5, seed=7))
    assert got["s1"] == (sampler(logits, 5),)


async def test_a_prompt_cut_by_the_stage_before_waits_as_one_frame(tiny_model: Path) -> None:
    """Chunks of one prompt that arrive while their first still waits join it (a queue of
    them would hold up other sessions' steps on the socket); the answer is the same."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    got: list[TokenFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        got.append(frame)

    worker = StageWorker(shard, EPOCH, None, send)
    long = [(5 * i) % 40 + 1 for i in range(50)]
    chunks = [
        replace(step("p", start, long[start : start + 20], ()), sample=start + 20 >= len(long))
        for start in range(0, len(long), 20)
    ]
    await run(worker, chunks, got, answers=1)
    assert worker.batches == 1  # one pass: the stage was alone, so the prompt went whole
    assert [f.tokens for f in got] == [greedy(tiny_model, long, 1)]


class _Said(dict[int, float]):
    """Pass costs by rows as a test says them: what the stage measures of the tiny model's
    passes (dominated by per-call work: 2 rows about 2.5x one) does not replace them."""

    def __setitem__(self, rows: int, ms: float) -> None:
        pass


async def two_answers_in_rhythm(
    model: Path, pass_ms: dict[int, float], long: list[int] | None = None
) -> tuple[list[int], int]:
    """Two answers 30 ms apart, a round every 150 ms, at a stage whose passes are said to
    take 200 ms and to have cost `pass_ms` by rows, and a `long` prompt arriving before the
    third round: the steps of each pass, and the holds."""
    shard = Shard.load(model, 0, load_spec(model).num_units)
    for i, prompt in enumerate(PROMPTS[:2]):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    sizes: list[int] = []
    sent: list[DataFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append(frame)

    worker = StageWorker(shard, EPOCH, None, send, lambda n, _s, _d: sizes.append(n))
    worker.costs.step_ms, worker.costs.row_ms = 200.0, 10.0  # a slice of 20 rows
    worker.costs.pass_ms = _Said(pass_ms)
    task = asyncio.create_task(worker.run())
    try:
        for r in range(4):
            if r == 2 and long is not None:
                await worker.put(step("long", 0, long, ()))
            for i, p in enumerate(PROMPTS[:2]):
                await worker.put(step(f"s{i}", len(p) + r, [3 + r], ()))
                await asyncio.sleep(0.03 if i == 0 else 0.12)
        while sum(f.session != "long" for f in sent) < 8:
            await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        await task
    return sizes, worker.schedule.holds


async def test_a_decode_batch_waits_for_a_session_due_within_a_pass(tiny_model: Path) -> None:
    """Once both answers have a rhythm the stage holds the first for the second, and they
    run as one batch (what two rows cost is not known: taken to pay, as on every device
    measured)."""
    sizes, _ = await two_answers_in_rhythm(tiny_model, {})
    # The first rounds run apart while the second answer's rhythm is not known yet (unless
    # a loaded machine delays a pass past the 30 ms between them).
    assert sizes[-2:] == [2, 2]


async def test_decode_steps_are_held_together_while_a_prompt_waits(tiny_model: Path) -> None:
    """With a prompt waiting its slices ride in the decode passes; the first answer's step is
    still held for the second's, so the two keep one pass (and one slice) a round, not one
    each."""
    long = [(7 * i) % 50 + 1 for i in range(200)]
    sizes, _ = await two_answers_in_rhythm(tiny_model, {}, long)
    assert sizes.count(3) >= 2  # the last two rounds: both steps and a slice of the prompt


async def test_no_hold_where_a_pass_costs_in_proportion_to_its_rows(tiny_model: Path) -> None:
    """Measured so (2 rows twice 1 row), holding would only delay the first answer: each
    runs on its own, as it arrives."""
    sizes, holds = await two_answers_in_rhythm(tiny_model, {1: 200.0, 2: 400.0})
    assert holds == 0
    assert sizes[-2:] != [2, 2]


class Sent(dict[str, tuple[int, ...]]):
    """The tokens a last stage sent, by session (the latest), and how many frames in all."""

    frames = 0


def last_stage(shard: Shard) -> tuple[StageWorker, list[int], Sent]:
    """A worker over a shard that ends the chain; the steps of each of its passes, and the
    tokens it sends, by session."""
    sizes: list[int] = []
    got = Sent()

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        got[frame.session] = frame.tokens
        got.frames += 1

    return StageWorker(shard, EPOCH, None, send, lambda n, _s, _d: sizes.append(n)), sizes, got


async def test_prompts_waiting_together_share_one_pass(tiny_model: Path) -> None:
    """Answers that arrive together start in one pass (and so decode as one wave); each
    gets the first token its own prefill gives."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    worker, sizes, got = last_stage(shard)
    await run(worker, [step(f"p{i}", 0, p, ()) for i, p in enumerate(PROMPTS)], got)
    assert sizes == [len(PROMPTS)]
    for i, prompt in enumerate(PROMPTS):
        assert got[f"p{i}"] == greedy(tiny_model, prompt, 1)


async def test_a_stage_spreads_its_sessions_over_the_waves_it_is_told(tiny_model: Path) -> None:
    """Eight answers start in one pass; their decode steps, waiting together at a stage told
    that sessions go in three waves, go in passes of at most three, each row giving the token
    its own pass would."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    prompts = [[i + 1, 2 * i + 3, 40 - i] for i in range(8)]
    sizes: list[int] = []
    got: dict[str, tuple[int, ...]] = {}

    async def send(addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, TokenFrame)
        got[frame.session] = got.get(frame.session, ()) + frame.tokens

    def worker() -> StageWorker:
        return StageWorker(shard, EPOCH, None, send, lambda n, _s, _d: sizes.append(n), (3,))

    first = worker()
    await run(first, [step(f"p{i}", 0, p, ()) for i, p in enumerate(prompts)], got)
    assert sizes == [8]
    steps = [step(f"p{i}", 3, list(got[f"p{i}"]), ()) for i in range(8)]
    decoding = worker()
    await run(decoding, steps, sizes, answers=4)
    assert sizes[1:] == [3, 3, 2]
    # Decode passes by rows, what the peer's pace is measured from; prompts are not counted.
    assert not first.costs.passes and decoding.costs.passes == {3: 2, 2: 1}
    assert set(decoding.costs.pass_ms) == {2, 3}
    for i, prompt in enumerate(prompts):
        assert got[f"p{i}"] == greedy(tiny_model, prompt, 2)


async def test_a_prompt_waits_for_a_decode_step_due_and_runs_beside_it(tiny_model: Path) -> None:
    """An answer decodes every 150 ms; a prompt arrives 10 ms before its next step is due,
    when even a slice would outlast that: it does not start a pass of its own (which the step
    would wait for, then pay a pass of its own with a slice beside it), but goes with the
    step. Both get the tokens they would get alone."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    shard.prefill("s0", torch.tensor(PROMPTS[0]))
    worker, sizes, got = last_stage(shard)
    worker.costs.step_ms, worker.costs.row_ms = 20.0, 1.0  # as measured: a slice of 20 rows
    long = [(7 * i) % 50 + 1 for i in range(70)]
    n = len(PROMPTS[0])
    last = step("s0", n + 3, [3], ())
    task = asyncio.create_task(worker.run())
    try:
        for r in range(3):
            await worker.put(step("s0", n + r, [3], ()))
            await asyncio.sleep(0.15 if r < 2 else 0.14)
        await worker.put(step("long", 0, long, ()))  # the step is due in 10 ms
        await asyncio.sleep(0.01)
        await worker.put(last)
        while "long" not in got:
            await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        await task
    assert sizes[:3] == [1, 1, 1]
    assert sizes[3] == 2  # the step and the prompt's first slice, in one pass
    assert got["long"] == greedy(tiny_model, long, 1)
    assert got["s0"] == alone(tiny_model, PROMPTS[0] + [3, 3, 3], last)


def passes_by_thread(
    shard: Shard, monkeypatch: pytest.MonkeyPatch, inline_ms: float = float("inf")
) -> list[int]:
    """The threads the shard's passes run on, in order, as they run. A pass measured within
    `inline_ms` counts as short: by default any, so that a host busy with other work, where
    a tiny model's pass could take longer than INLINE_MS, does not decide the test."""
    monkeypatch.setattr(stage_module, "INLINE_MS", inline_ms)
    threads: list[int] = []

    def noting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident())
            return fn(*args, **kwargs)

        return run

    shard.prefill = noting(shard.prefill)  # type: ignore[method-assign]
    shard.decode_batch = noting(shard.decode_batch)  # type: ignore[method-assign]
    return threads


@pytest.mark.parametrize("inline_ms, on_loop", [(float("inf"), True), (1e-6, False)])
async def test_decode_passes_measured_short_run_on_the_event_loop(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, inline_ms: float, on_loop: bool
) -> None:
    """Once passes of a decode batch's size are measured short, the next runs on the loop
    itself (no handoff, no interpreter lock shared with the loop); a prompt's pass, a decode
    pass of a size not measured yet, and one measured longer, in the model thread. The tokens
    do not change."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    threads = passes_by_thread(shard, monkeypatch, inline_ms)
    worker, _sizes, got = last_stage(shard)
    task = asyncio.create_task(worker.run())
    tokens: list[int] = []
    try:
        await worker.put(step("s0", 0, PROMPTS[0], ()))
        for i in range(3):
            while got.frames <= i:  # a pass's output is sent after the pass is counted
                await asyncio.sleep(0.01)
            tokens.append(got["s0"][0])
            if i < 2:
                await worker.put(step("s0", len(PROMPTS[0]) + i, [tokens[-1]], ()))
    finally:
        await worker.close("done")
        await task
    loop_thread = threading.get_ident()
    assert [t == loop_thread for t in threads] == [False, False, on_loop]
    assert tuple(tokens) == greedy(tiny_model, PROMPTS[0], 3)


async def test_passes_verifying_drafts_measured_short_run_on_the_event_loop(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that verifies a draft is measured by its rows: one of as many rows as a pass
    measured short runs on the loop (an origin on this peer then handles the tokens of the
    step that started it after the pass, not beside it); one of other rows, in the thread
    first. Each gives the tokens its own pass gives alone."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    shard.prefill("s0", torch.tensor(PROMPTS[0]))
    threads = passes_by_thread(shard, monkeypatch)
    worker, _sizes, got = last_stage(shard)
    task = asyncio.create_task(worker.run())
    start = len(PROMPTS[0])
    frames = [step("s0", start, [3], (4, 5)), step("s0", start, [3], (4, 6))]
    frames.append(step("s0", start, [3], (4, 5, 6)))
    tokens = []
    try:
        for i, frame in enumerate(frames):
            await worker.put(frame)  # each from the same position: the cache is cut back
            while got.frames <= i:
                await asyncio.sleep(0.01)
            tokens.append(got["s0"])
    finally:
        await worker.close("done")
        await task
    loop_thread = threading.get_ident()
    assert [t == loop_thread for t in threads] == [False, True, False]
    assert set(worker.costs.verify_ms) == {3, 4}
    assert tokens == [alone(tiny_model, PROMPTS[0], f) for f in frames]


async def test_a_pass_goes_to_the_model_thread_while_outputs_wait_to_be_sent(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the loop, a pass would hold up what is still going out (a slow link's send)."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    for i, prompt in enumerate(PROMPTS[:2]):
        shard.prefill(f"s{i}", torch.tensor(prompt))
    threads = passes_by_thread(shard, monkeypatch)
    release = asyncio.Event()

    async def send(addr: str, frame: DataFrame) -> None:
        if frame.session == "s0" and len(threads) > 1:
            await release.wait()  # a slow link

    worker = StageWorker(shard, EPOCH, "next:1", send)
    task = asyncio.create_task(worker.run())
    try:
        for i, session in enumerate(["s0", "s0", "s1", "s1"]):
            start = len(PROMPTS[int(session[1])]) + (i % 2)
            await worker.put(step(session, start, [3], ()))
            while worker.batches <= i:
                await asyncio.sleep(0.01)
    finally:
        release.set()
        await worker.close("done")
        await task
    loop_thread = threading.get_ident()
    # Measured; then on the loop; then s0's output waits to go out: to the thread.
    assert [t == loop_thread for t in threads] == [False, True, False, False]


async def test_a_session_cache_is_allocated_once_for_what_it_reserved(
    tiny_model: Path,
) -> None:
    """A session reserves, on admission, the positions it may reach: its cache takes that
    at once and never grows by copying; a step of a session the stage does not hold still
    meets the error it is, and leaves nothing behind."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    spec = shard.spec
    sent: list[DataFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append(frame)

    worker = StageWorker(shard, EPOCH, None, send)
    reserve = len(PROMPTS[0]) + 300  # past a first allocation's 256 positions
    task = asyncio.create_task(worker.run())
    try:
        await worker.put(replace(step("s0", 0, PROMPTS[0], ()), reserve=reserve))
        sizes = []
        for i in range(3):
            while worker.batches <= i:
                await asyncio.sleep(0.01)
            sizes.append(shard.kv_bytes())
            frame = step("s0", len(PROMPTS[0]) + i, [3], ())
            await worker.put(replace(frame, reserve=reserve))
        # Beside s0's last decode step, which waits with it: a packed pass would start it.
        await worker.put(replace(step("stranger", 7, [3], ()), reserve=reserve))
        async with asyncio.timeout(10):
            while not any(isinstance(f, ErrorFrame) for f in sent):
                await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        await task
    per_position = 2 * spec.num_kv_heads * spec.head_dim * 4 * len(shard.layer_ids)
    assert sizes == [reserve * per_position] * 3
    errors = [f for f in sent if isinstance(f, ErrorFrame)]
    assert [e.code for e in errors] == [ErrorCode.UNKNOWN_SESSION]
    assert shard.sessions == ["s0"]


async def test_a_lone_step_at_an_idle_stage_runs_and_goes_out_where_it_arrives(
    tiny_model: Path,
) -> None:
    """Once a lone step's pass is measured short, the next one runs inside `put_now` (a raw
    link's reading callback) and its tokens are written before it returns; where the link
    cannot take them at once, the sender sends them, and the answer is the same."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    prompt = PROMPTS[0]
    shard.prefill("s", torch.tensor(prompt))
    truth = greedy(tiny_model, prompt, 4)
    later: list[DataFrame] = []
    now: list[DataFrame] = []
    taking = True

    async def send(addr: str, frame: DataFrame) -> None:
        later.append(frame)

    def send_now(addr: str, frame: DataFrame) -> bool:
        if taking:
            now.append(frame)
        return taking

    def tokens(frames: list[DataFrame]) -> list[tuple[int, ...]]:
        return [f.tokens for f in frames if isinstance(f, TokenFrame)]

    worker = StageWorker(shard, EPOCH, None, send, send_now=send_now)
    task = asyncio.create_task(worker.run())
    try:
        await worker.put(replace(step("s", len(prompt), [truth[0]], ()), step=1))
        while not later:  # not measured yet: by the compute task and the sender
            await asyncio.sleep(0.01)
        assert worker.put_now(replace(step("s", len(prompt) + 1, [truth[1]], ()), step=2))
        assert tokens(now) == [(truth[2],)]  # written before put_now returned
        taking = False
        assert worker.put_now(replace(step("s", len(prompt) + 2, [truth[2]], ()), step=3))
        while len(later) < 2:
            await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert tokens(later) == [(truth[1],), (truth[3],)]
    assert worker.batches == 3


async def test_steps_read_together_wait_for_each_other_rather_than_run_one_at_once(
    tiny_model: Path,
) -> None:
    """A raw link's read brought two sessions' steps (a wave's, back to back): the first is
    queued, not run alone in `put_now` with the second still unread, and one pass runs both."""
    shard = Shard.load(tiny_model, 0, load_spec(tiny_model).num_units)
    truths = []
    for name, prompt in (("s", PROMPTS[0]), ("t", PROMPTS[1])):
        shard.prefill(name, torch.tensor(prompt))
        truths.append(greedy(tiny_model, prompt, 3))
    now: list[DataFrame] = []
    later: list[DataFrame] = []

    async def send(addr: str, frame: DataFrame) -> None:
        later.append(frame)

    def send_now(addr: str, frame: DataFrame) -> bool:
        now.append(frame)
        return True

    def stepped(i: int, n: int) -> StepFrame:
        name, prompt = ("s", "t")[i], PROMPTS[i]
        return replace(step(name, len(prompt) + n, [truths[i][n]], ()), step=n + 1)

    worker = StageWorker(shard, EPOCH, None, send, send_now=send_now)
    task = asyncio.create_task(worker.run())
    try:
        for i in range(2):  # each alone: a lone step's pass is measured short here
            await worker.put(stepped(i, 0))
            while len(later) + len(now) < i + 1:
                await asyncio.sleep(0.01)
        passes, sent = worker.batches, len(now) + len(later)
        assert worker.put_now(stepped(0, 1), at_once=False)
        assert len(now) + len(later) == sent  # queued, not run
        assert worker.put_now(stepped(1, 1))  # the last of the read: two wait, so not run here
        assert len(now) + len(later) == sent
        while len(now) + len(later) < sent + 2:
            await asyncio.sleep(0.01)
    finally:
        await worker.close("done")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert worker.batches == passes + 1
    got = {(f.session, f.tokens) for f in now + later if isinstance(f, TokenFrame)}
    assert {("s", (truths[0][2],)), ("t", (truths[1][2],))} <= got
