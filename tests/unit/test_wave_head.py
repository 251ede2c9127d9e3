"""A wave's head at the first stage: two stages of a real (tiny) model, the last sending a
whole wave's normed hidden states for the first to score in one product; every answer token
for token one process's. Then the rows held when one never comes, and a row the stage
cannot score."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from support.wavechain import EPOCH, GREEDY, Chain, greedy, prompt_step

from meshshard.chain import wavehead
from meshshard.chain.stage import StageWorker
from meshshard.chain.tensors import rows, to_wire
from meshshard.chain.wavehead import WaveRows
from meshshard.model.shard import Shard, load_spec
from meshshard.wire import DataFrame, ErrorCode, ErrorFrame, StepFrame, TokenFrame

PROMPTS = [[5, 17, 3, 42, 8], [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8], [40, 2, 11]]
TOKENS = 6


@pytest.fixture(scope="module", params=["llama", "llama-untied"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


async def test_a_waves_head_scored_at_the_first_stage_gives_one_processs_tokens(
    model: Path,
) -> None:
    chain = Chain(model, wave_head=True)
    await chain.answer(PROMPTS, TOKENS)
    for i, prompt in enumerate(PROMPTS):
        assert chain.tokens[f"s{i}"] == greedy(model, prompt, TOKENS)
    assert not chain.errors
    tied = load_spec(model).tied_embeddings
    # Every decode step after the prompts' went round with its head at the first stage (the
    # last step's head stays: nothing follows it), its rows in products of the whole wave.
    waves = TOKENS - 2
    assert chain.first.first_head.wave_rows == (waves * len(PROMPTS) if tied else 0)
    # ... timed apart from whole passes, by rows, as a lone answer's split passes are.
    assert chain.last.costs.split_passes == ({len(PROMPTS): waves} if tied else {})
    whole = {len(PROMPTS): 1 if tied else waves + 1}  # the last step keeps its head
    assert chain.last.costs.passes == whole
    assert chain.first.batches == TOKENS  # the prompts, then one pass a wave
    assert not chain.first.first_head._wave.rows  # nothing left held


async def test_each_of_two_waves_has_its_head_scored_at_the_first_stage(model: Path) -> None:
    """Four answers in two waves of two: the last stage sends each wave's rows as it passes
    them, the first scores each wave's head between its own passes; token for token one
    process's."""
    chain = Chain(model, wave_head=True, waves=(2,))
    await chain.answer(PROMPTS, TOKENS)
    for i, prompt in enumerate(PROMPTS):
        assert chain.tokens[f"s{i}"] == greedy(model, prompt, TOKENS)
    assert not chain.errors
    if not load_spec(model).tied_embeddings:
        assert chain.first.first_head.wave_rows == 0
        return
    waves = TOKENS - 2
    assert chain.first.first_head.wave_rows == waves * len(PROMPTS)
    assert chain.last.costs.split_passes == {2: 2 * waves}  # each wave's pass without its head


def test_a_waves_pass_beside_a_slice_leaves_the_waves_head_to_the_first_stage(
    tiny_llama: Path,
) -> None:
    """A last stage's pass of a wave's two steps and a prompt's slice that samples nothing
    (a long prompt going through while answers decode): the steps' normed rows go to the
    first stage, `together` the two, the slice gives nothing, as a whole pass's does; the
    first stage's whole head picks the tokens the whole pass would."""
    spec = load_spec(tiny_llama)
    cut, n = spec.num_units // 2, spec.num_units
    first = Shard.load(tiny_llama, 0, cut)
    waved, whole = (
        StageWorker(Shard.load(tiny_llama, cut, n), EPOCH, None, _unsent, wave_head=on)
        for on in (True, False)
    )
    long = [(7 * i) % 90 + 3 for i in range(40)]
    batch = []
    for i, prompt in enumerate([*PROMPTS[:2], long[:16]]):
        h = first.prefill(f"s{i}", torch.tensor(prompt))
        for worker in (waved, whole):
            worker.shard.prefill(f"s{i}", h, logits=0)
        if i < 2:  # a decode step each: the prompt's last token again, at the next position
            x, start, sample = torch.tensor(prompt[-1:]), len(prompt), True
        else:  # the long prompt's next slice
            x, start, sample = torch.tensor(long[16:32]), 16, False
        h = first.prefill(f"s{i}", x, torch.arange(start, start + x.shape[0]), logits=0)
        step = prompt_step(f"s{i}", prompt, TOKENS)
        batch.append(replace(step, step=1, start=start, tensor=to_wire(h), sample=sample))
    assert waved._splits(batch) and not whole._splits(batch)
    # A slice of one row would be timed as one of the wave's steps: that pass runs whole.
    one_row = replace(batch[2], tensor=rows(batch[2].tensor, 0, 1))
    assert not waved._splits([*batch[:2], one_row])
    normed, tokens = waved._pass(batch, split=True), whole._pass(batch, split=False)
    assert normed[2] == () and tokens[2] == ()
    assert [r.together for r in normed[:2]] == [2, 2]  # type: ignore[union-attr]
    hidden = torch.cat([r.hidden for r in normed[:2]])  # type: ignore[union-attr]
    assert first.pick(hidden, 0, spec.vocab_size)[1] == (*tokens[0], *tokens[1])


async def _unsent(addr: str, frame: DataFrame) -> None:
    raise AssertionError("a pass called directly sends nothing")


async def test_without_the_plans_word_the_last_stage_scores_its_waves(model: Path) -> None:
    chain = Chain(model, wave_head=False)
    await chain.answer(PROMPTS, TOKENS)
    for i, prompt in enumerate(PROMPTS):
        assert chain.tokens[f"s{i}"] == greedy(model, prompt, TOKENS)
    assert chain.first.first_head.wave_rows == 0 and chain.last.costs.split_steps == 0


async def test_rows_held_for_one_that_never_comes_are_scored_after_a_wait(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows of a pass of three come; after the wait both are scored and go on, each
    the token the whole head gives its row."""
    monkeypatch.setattr(wavehead, "WAIT_S", 0.02)
    spec = load_spec(tiny_llama)
    cut = spec.num_units // 2
    first_shard = Shard.load(tiny_llama, 0, cut)
    last_shard = Shard.load(tiny_llama, cut, spec.num_units)
    sent: list[tuple[str, DataFrame]] = []

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append((addr, frame))

    first = StageWorker(first_shard, EPOCH, "last", send)
    rows = []
    for i, prompt in enumerate(PROMPTS[:2]):
        h = first_shard.prefill(f"s{i}", torch.tensor(prompt))
        normed = last_shard.prefill(f"s{i}", h, logits=1, head=False)
        rows.append(wave_row(prompt_step(f"s{i}", prompt, TOKENS), normed, spec.vocab_size))
    task = asyncio.create_task(first.run())
    try:
        for row in rows:
            await first.put(row)
        assert len(first.first_head._wave.rows) == 2 and not sent  # held for the third
        async with asyncio.timeout(5):
            while len([f for _, f in sent if isinstance(f, TokenFrame)]) < 2:
                await asyncio.sleep(0.01)
    finally:
        await first.close("done")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    heard = {f.session: f.tokens for _, f in sent if isinstance(f, TokenFrame)}
    assert heard == {f"s{i}": tuple(greedy(tiny_llama, p, 1)) for i, p in enumerate(PROMPTS[:2])}
    assert first.first_head.wave_rows == 2


def wave_row(frame: StepFrame, normed: torch.Tensor, head: int) -> StepFrame:
    """The row of a wave of three the last stage sends for `frame`'s prompt as if its last
    position were a decode step: that position's normed hidden state."""
    start = frame.start + frame.tensor.shape[0] - 1
    return replace(frame, start=start, tensor=to_wire(normed), head=head, together=3)


async def test_a_waves_row_at_a_stage_that_cannot_score_it_is_refused(tiny_llama: Path) -> None:
    spec = load_spec(tiny_llama)
    cut = spec.num_units // 2
    sent: list[tuple[str, DataFrame]] = []

    async def send(addr: str, frame: DataFrame) -> None:
        sent.append((addr, frame))

    normed = torch.zeros(1, spec.hidden_size)
    step = prompt_step("s0", PROMPTS[0], TOKENS)
    middle = StageWorker(Shard.load(tiny_llama, cut, cut + 1), EPOCH, "last", send)
    first = StageWorker(Shard.load(tiny_llama, 0, cut), EPOCH, "last", send)
    for worker, head in ((middle, spec.vocab_size), (first, spec.vocab_size - 16)):
        task = asyncio.create_task(worker.run())
        try:
            await worker.put(wave_row(step, normed, head))
            async with asyncio.timeout(5):
                while not sent:
                    await asyncio.sleep(0.01)
        finally:
            await worker.close("done")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        (addr, error), *_ = sent
        assert addr == "origin" and isinstance(error, ErrorFrame)
        assert error.code == ErrorCode.BAD_FRAME and "whole head" in error.message
        sent.clear()
        assert not worker.first_head._wave.rows


def test_wave_rows_go_together_once_the_pass_has_sent_them_all() -> None:
    step = prompt_step("s0", PROMPTS[0], TOKENS)
    rows = WaveRows()
    a, b, c = (StepFrame(EPOCH, s, 1, 5, step.tensor, "o", True, GREEDY, together=3) for s in "abc")
    assert rows.add(a) == [] and rows.add(b) == [] and len(rows) == 2
    assert rows.add(c) == [a, b, c] and len(rows) == 0
    rows.add(a)
    rows.add(b)
    rows.forget("a")
    assert rows.take() == [b] and rows.take() == []
