"""The data plane at the simulated level: real control nodes and chain services of several
peers in one process, over in-memory networks, on a tiny random model. Crashes, joins,
leaves, stale and unknown frames, twenty answers at once and what is left afterwards: each
answer token for token that of one process, in seconds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from support.simchain import SIM_TIMINGS, MemoryLinks, SimMesh

from meshshard.chain import cores
from meshshard.chain.origin import PREFILL_CHUNK, MeshTooSmall
from meshshard.chain.passes import one_token
from meshshard.chain.stage import StageWorker
from meshshard.chain.stats import ChainStats
from meshshard.chain.tensors import to_wire
from meshshard.mesh.report import plan_flow, predicted_now
from meshshard.model.costs import unit_costs
from meshshard.model.device import Device, Placement
from meshshard.model.generate import LocalChain, generate
from meshshard.planner.flow import Speculation, latency_ms, tokens_per_s
from meshshard.types import Epoch, NodeId, PlanRecord
from meshshard.wire import (
    DataFrame,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    KVFrame,
    Sampling,
    StepFrame,
)

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42], [7] * 12, [88, 3, 61, 20, 19, 4, 77]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six layers: with memory for 40% of it, a peer holds two, and a chain takes three."""
    return build_tiny("llama", tmp_path_factory.mktemp("sim-llama"), layers=6)


@pytest.fixture(scope="module")
def reference(model: Path) -> Callable[[Sequence[int], int], list[int]]:
    chain = LocalChain.load(model)
    return lambda prompt, n: list(generate(chain, prompt, n))


@pytest.fixture(scope="module")
def memory(model: Path) -> float:
    """What each peer offers: 40% of the model's weights and planned KV."""
    units = unit_costs(model, "float32")
    return 0.4 * sum(u.weight_bytes + u.kv_bytes_per_token * 2048 for u in units)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)
    assert check(), what


async def three_stages(mesh: SimMesh, names: str, frame: int = 0) -> PlanRecord:
    """Start the named peers (each taking frames of at most `frame` bytes, 0: any) and wait
    for them to agree on a ready 3-stage chain."""
    for name in names:
        mesh.add(name, frame=frame)
    await until(lambda: mesh.agreed(3), 20, "a 3-stage chain")
    plan = mesh.peers[names[0]].node.book.current
    assert plan is not None
    return plan


async def answer(mesh: SimMesh, origin: str, prompt: Sequence[int], n: int, got: list[int]) -> None:
    async for token in mesh.peers[origin].service.origin.generate(prompt, n):
        got.append(token)


async def test_a_simulated_mesh_answers_as_one_process(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    async with SimMesh(model, memory) as mesh:
        for name in ("a", "b", "c"):
            mesh.add(name)
        await until(lambda: mesh.agreed(3), 20, "a 3-stage chain")
        for prompt in PROMPTS:
            got: list[int] = []
            await answer(mesh, "a", prompt, 16, got)
            assert got == reference(prompt, 16)
        await until(mesh.idle, 5, "every cache freed")
        # Each peer's links forgot each answer once its drop came (its origin's own included):
        # a socket closing later tells no origin of answers that are over.
        assert [len(set(links.forgotten)) for links in mesh.data.links] == [len(PROMPTS)] * 3


async def test_a_quantized_mesh_answers_as_the_quantized_single_process(
    model: Path, memory: float
) -> None:
    int8 = Placement(Device("cpu"), "float32", "int8")
    chain = LocalChain.load(model, quantize="int8")
    async with SimMesh(model, memory, placement=int8) as mesh:
        for name in ("a", "b", "c"):
            mesh.add(name)
        await until(lambda: mesh.agreed(3), 20, "a 3-stage chain")
        for prompt in PROMPTS[:2]:
            got: list[int] = []
            await answer(mesh, "a", prompt, 16, got)
            assert got == list(generate(chain, prompt, 16))


class Collector:
    """Plays an origin on the data network: keeps what comes back."""

    def __init__(self) -> None:
        self.frames: list[DataFrame] = []

    async def handle_frame(self, frame: DataFrame) -> None:
        self.frames.append(frame)


async def test_stale_and_unknown_frames_get_error_frames(model: Path, memory: float) -> None:
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abc")
        first = mesh.peers[plan.stages[0].device].service
        probe = Collector()
        mesh.data.services["10.7.9.9:1"] = probe  # type: ignore[assignment]
        ids, sampling = to_wire(torch.tensor([1, 2, 3])), Sampling(0.0, 1.0, 1)
        old = Epoch(plan.epoch.term - 1, plan.epoch.coordinator)
        await first.handle_frame(StepFrame(old, "x/1", 0, 0, ids, "10.7.9.9:1", True, sampling))
        await first.handle_frame(
            StepFrame(plan.epoch, "x/2", 5, 40, ids, "10.7.9.9:1", True, sampling)
        )
        # A split head's step for a stage that holds no head matrix (the middle one).
        middle = mesh.peers[plan.stages[1].device].service
        hidden = to_wire(torch.zeros(1, mesh.spec.hidden_size))
        split = StepFrame(
            plan.epoch, "x/3", 5, 40, hidden, "10.7.9.9:1", True, sampling,
            loop="10.7.0.1:7000", until=9, head=16,
        )  # fmt: skip
        await middle.handle_frame(split)
        # Frames the wire passes that no pass can run: ids past the vocabulary at the first
        # stage, ids at the middle one. Refused before admission: nothing is reserved.
        past = to_wire(torch.tensor([1, mesh.spec.vocab_size]))
        await first.handle_frame(
            StepFrame(plan.epoch, "x/4", 0, 0, past, "10.7.9.9:1", True, sampling)
        )
        await middle.handle_frame(
            StepFrame(plan.epoch, "x/5", 0, 0, ids, "10.7.9.9:1", True, sampling)
        )
        # A session met mid-answer (admitted past the budget, as one moved by a plan change)
        # that claims more positions than the context: its cache would be allocated for all
        # of them at once.
        claim = StepFrame(plan.epoch, "x/6", 3, 0, hidden, "10.7.9.9:1", True, sampling)
        await middle.handle_frame(replace(claim, reserve=2**31 - 1))
        await until(lambda: len(probe.frames) == 6, 5, "six error frames")
        codes = {f.session: f.code for f in probe.frames if isinstance(f, ErrorFrame)}
        assert codes == {
            "x/1": ErrorCode.STALE_EPOCH,
            "x/2": ErrorCode.UNKNOWN_SESSION,
            "x/3": ErrorCode.BAD_FRAME,
            "x/4": ErrorCode.BAD_FRAME,
            "x/5": ErrorCode.BAD_FRAME,
            "x/6": ErrorCode.BAD_FRAME,
        }
        budgets = (first.follower.budget, middle.follower.budget)
        assert not any(b.held(s) for b in budgets for s in ("x/4", "x/5", "x/6"))


async def test_steps_of_an_attempt_the_origin_gave_up_are_dropped(
    model: Path, memory: float
) -> None:
    """Once a stage has seen a session's attempt, steps of an older one end there unrun (a
    chain feeding itself may still be running an attempt its origin gave up)."""
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abcd")
        spare = next(p for p in "abcd" if plan.stage_of(NodeId(p)) is None)
        stage = mesh.peers[plan.stages[0].device].service
        ids, sampling = to_wire(torch.tensor([1, 2, 3])), Sampling(0.0, 1.0, 1)
        ran = []
        for attempt in (0, 2, 1, 3):
            before = stage.follower.steps
            origin = mesh.peers[spare].addr  # a member: the session is not swept as orphaned
            frame = StepFrame(plan.epoch, "x/1", 0, 0, ids, origin, True, sampling, attempt)
            await stage.handle_frame(frame)
            await asyncio.sleep(0.3)
            ran.append(stage.follower.steps - before)
        assert ran == [1, 1, 0, 1]


async def test_an_answer_ended_while_its_first_step_waited_on_a_switch_reserves_nothing(
    model: Path, memory: float
) -> None:
    """A step (or a handoff's cache) waits out a plan switch under way; its origin's drop
    comes meanwhile on another link. Neither may reserve the session's KV budget or keep its
    cache afterwards: nothing would free them until the session went quiet."""
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abcd")
        spare = next(p for p in "abcd" if plan.stage_of(NodeId(p)) is None)
        stage = mesh.peers[plan.stages[0].device].service
        ids, sampling = to_wire(torch.tensor([1, 2, 3])), Sampling(0.0, 1.0, 1)
        origin = mesh.peers[spare].addr
        frame = StepFrame(plan.epoch, "x/1", 0, 0, ids, origin, True, sampling)
        # A handoff's cache for another session, ended so while it waited.
        shard = stage.follower.stage.shard
        kv = to_wire(torch.zeros(1, mesh.spec.num_kv_heads, 3, mesh.spec.head_dim))
        piece = KVFrame(plan.epoch, "x/2", 0, shard.layer_ids[0], kv, kv, origin, True)
        before = stage.follower.steps
        async with stage.follower._switch:
            waiting = [stage.handle_frame(frame), stage.handle_frame(piece)]
            tasks = [asyncio.create_task(w) for w in waiting]
            await asyncio.sleep(0.05)  # both wait on the switch
            for session in ("x/1", "x/2"):
                drop = stage.handle_frame(DropFrame(plan.epoch, session))
                tasks.append(asyncio.create_task(drop))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)
        assert stage.follower.budget.held("x/1") == 0
        assert stage.follower.steps == before
        assert not {"x/1", "x/2"} & {str(s) for s in shard.sessions}


@pytest.mark.parametrize("speculate", [8, 0], ids=["speculating", "chain feeding itself"])
@pytest.mark.parametrize(
    "victim, silent",
    [(0, False), (1, False), (2, False), (1, True)],
    ids=["coordinator and first stage", "middle", "last", "middle, host gone silent"],
)
async def test_an_answer_survives_a_stage_crashing_mid_answer(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    victim: int,
    silent: bool,
    speculate: int,
) -> None:
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abcd")
        # The origin stays up: the coordinator (stage 0), or the last stage when stage 0 dies;
        # the spare, for a chain that feeds itself (an origin that is no stage; the leave and
        # crash-and-join tests below have a stage for their origin).
        spare = next(NodeId(p) for p in "abcd" if plan.stage_of(NodeId(p)) is None)
        origin = plan.stages[0 if victim else -1].device if speculate else spare
        follower = mesh.peers[spare].service.follower
        await until(lambda: follower.standby is not None, 20, "the spare's standby loaded")
        assert follower.standby is not None
        preloaded = (follower.standby.start, follower.standby.end)
        mesh.data.delay = 0.005  # so the answer is still going when the crash is noticed
        got: list[int] = []
        task = asyncio.create_task(answer(mesh, origin, PROMPTS[0], 48, got))
        await until(lambda: len(got) >= 5, 20, "the answer under way")
        loop = asyncio.get_running_loop()
        before, killed = len(got), loop.time()
        mesh.kill(plan.stages[victim].device, silent)
        await until(lambda: len(got) > before + 1, 30, "the answer going again")
        pause = loop.time() - killed
        await asyncio.wait_for(task, 60)
        assert got == reference(PROMPTS[0], 48)
        # A crash is known from the links and a refused probe at once, a silent loss only
        # after a suspicion timeout.
        print(f"pause {pause:.3f} s")
        if not silent:
            assert pause < SIM_TIMINGS.suspicion_timeout
        else:
            assert pause > SIM_TIMINGS.suspicion_timeout
        stats = mesh.peers[origin].service.stats
        assert stats.replays > 0  # its cache died: fed again
        assert (stats.kept > 0) == bool(speculate)  # ... through an answer that speculated
        # The victim's precomputed fallback was put in force as it stood (by the next
        # coordinator, where the coordinator died), and the spare switched onto its
        # preloaded units where the fallback gave it those.
        fallback = mesh.peers[origin].node.book.current
        expected = plan.fallback(plan.stages[victim].device)
        assert fallback is not None and expected is not None
        assert fallback.stages == expected.stages
        mine = fallback.stage_of(spare)
        assert mine is not None
        used = mesh.peers[spare].service.stats.standbys_used
        assert used == ((mine.start, mine.end) == preloaded), (mine, preloaded, used)


@pytest.mark.parametrize("speculate", [8, 0], ids=["speculating", "chain feeding itself"])
async def test_a_graceful_leave_hands_caches_over_without_replaying(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    speculate: int,
) -> None:
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abcd")
        got, stats = await answer_through_a_leave(mesh, plan, PROMPTS[3])
        assert got == reference(PROMPTS[3], 64)
        assert stats.handoffs > 0 and stats.replays == 0


async def answer_through_a_leave(
    mesh: SimMesh, plan: PlanRecord, prompt: Sequence[int]
) -> tuple[list[int], ChainStats]:
    """A 64-token answer from the plan's first stage while its second leaves gracefully:
    its tokens, and its origin's counts."""
    origin, leaving = plan.stages[0].device, plan.stages[1].device
    mesh.data.delay = 0.01  # so the answer is still going when the new chain is ready
    got: list[int] = []
    task = asyncio.create_task(answer(mesh, origin, prompt, 64, got))
    await until(lambda: len(got) >= 5, 20, "the answer under way")
    assert await mesh.leave(leaving)
    await asyncio.wait_for(task, 60)
    return got, mesh.peers[origin].service.stats


@pytest.mark.parametrize("said", [False, True], ids=["links' own limit", "receivers' profiles"])
async def test_frames_past_the_limit_cross_in_pieces_prompts_and_handed_off_caches(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]], said: bool
) -> None:
    """Frames of at most 1,500 bytes (as --max-frame sets; a large model's long prompt, or a
    layer of a long answer's cache, passes 64 MB): a prompt's activations go as steps of a
    few rows, each handed-off layer as pieces of a few positions appended in turn. The
    answer is one process's, and its caches were handed over, not replayed. The limit is the
    links' own, or what each receiver takes, which only its profile tells the senders."""
    async with SimMesh(model, memory, speculate=0) as mesh:
        if not said:
            mesh.data.max_frame = 1500
        plan = await three_stages(mesh, "abcd", frame=1500 if said else 0)
        prompt = list(range(3, 60))
        got, stats = await answer_through_a_leave(mesh, plan, prompt)
        assert got == reference(prompt, 64)
        assert stats.handoffs > 0 and stats.replays == 0
        assert mesh.data.cut["StepFrame"] > 0 and mesh.data.cut["KVFrame"] > 0


@pytest.mark.parametrize("speculate", [8, 0], ids=["speculating", "chain feeding itself"])
async def test_twenty_answers_through_a_crash_and_a_join_leave_nothing_behind(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    speculate: int,
) -> None:
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abcd")
        origin, victim = plan.stages[0].device, plan.stages[1].device
        answers: list[list[int]] = [[] for _ in range(20)]
        tasks = [
            asyncio.create_task(answer(mesh, origin, PROMPTS[i % 4], 32, answers[i]))
            for i in range(20)
        ]
        await until(lambda: sum(len(a) >= 3 for a in answers) >= 10, 30, "answers under way")
        mesh.kill(victim)
        mesh.add("z", priority=5)  # takes over as coordinator, and the first stage
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        for i, got in enumerate(answers):
            assert got == reference(PROMPTS[i % 4], 32), i
        # Batched passes verified drafts of different lengths, when speculating.
        assert (mesh.peers[origin].service.stats.kept > 0) == bool(speculate)
        assert mesh.peers["z"].node.coordinator == "z"
        # Everything of the finished answers is freed: at once, or when a cache left behind
        # by a plan change that no handoff claimed expires, never later.
        await until(mesh.idle, SIM_TIMINGS.left_behind_keep + 3, f"freed: {mesh.holding()}")


async def test_a_dead_origins_answers_are_freed(model: Path, memory: float) -> None:
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abcd")
        outside = next(n for n in mesh.peers if plan.stage_of(n) is None)  # type: ignore[arg-type]
        got: list[int] = []
        task = asyncio.create_task(answer(mesh, outside, PROMPTS[1], 500, got))
        await until(lambda: len(got) >= 5, 20, "the answer under way")
        mesh.kill(outside)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(mesh.idle, 10, f"its caches freed: {mesh.holding()}")


async def test_a_mesh_too_small_says_so_at_once_and_answers_again_after_a_join(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abc")
        origin, victim = plan.stages[0].device, plan.stages[1].device
        mesh.data.delay = 0.005
        got: list[int] = []
        task = asyncio.create_task(answer(mesh, origin, PROMPTS[0], 200, got))
        await until(lambda: len(got) >= 5, 20, "the answer under way")
        mesh.kill(victim)  # two peers of 40% each cannot hold the model
        loop = asyncio.get_running_loop()
        killed = loop.time()
        with pytest.raises(MeshTooSmall, match=r"model does not fit: needs [0-9,]+ MB"):
            await asyncio.wait_for(task, 30)
        # Death noticed (suspicion), then the verdict's grace: seconds, not the step timeout.
        limit = SIM_TIMINGS.suspicion_timeout + SIM_TIMINGS.too_small_grace + 2
        assert loop.time() - killed < limit
        started = loop.time()
        with pytest.raises(MeshTooSmall, match="does not fit"):
            await answer(mesh, origin, PROMPTS[1], 8, [])
        assert loop.time() - started < SIM_TIMINGS.too_small_grace + 1
        mesh.add("d")  # a peer joins: the mesh answers again by itself
        await until(lambda: mesh.agreed(3), 20, "a 3-stage chain again")
        again: list[int] = []
        await answer(mesh, origin, PROMPTS[1], 8, again)
        assert again == reference(PROMPTS[1], 8)


async def seeded(mesh: SimMesh, origin: str, prompt: Sequence[int], n: int) -> list[int]:
    stream = mesh.peers[origin].service.origin.generate(prompt, n, sampling=(0.9, 0.95, 1234))
    return [token async for token in stream]


@pytest.mark.parametrize("speculate", [0, 4, 16])
async def test_speculation_changes_no_token(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    speculate: int,
) -> None:
    """Drafted tokens are verified by the chain: greedy answers equal one process's, seeded
    answers equal those without speculation, whatever share of the drafts is confirmed."""
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abc")
        origin = plan.stages[0].device
        for prompt in PROMPTS:
            got: list[int] = []
            await answer(mesh, origin, prompt, 40, got)
            assert got == reference(prompt, 40)
        sampled = [await seeded(mesh, origin, p, 40) for p in PROMPTS]
        stats = mesh.peers[origin].service.stats
        print(f"speculate {speculate}: {stats}")
        if speculate:
            assert 0 < stats.kept < stats.drafted  # drafts confirmed and drafts refused
            assert stats.passes < stats.tokens_out  # some passes gave several tokens
        else:
            assert stats.drafted == 0 and stats.passes == stats.tokens_out
        await until(mesh.idle, 5, "every cache freed")
    async with SimMesh(model, memory, speculate=0) as plain:
        plan = await three_stages(plain, "abc")
        origin = plan.stages[0].device
        assert sampled == [await seeded(plain, origin, p, 40) for p in PROMPTS]


async def test_frames_to_oneself_never_touch_the_network(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """The origin is the first stage here: its steps to itself and the drops at the end go
    straight to its own service, in order, and the answer is unchanged."""
    async with SimMesh(model, memory) as mesh:
        plan = await three_stages(mesh, "abc")
        origin = mesh.peers[plan.stages[0].device]
        got: list[int] = []
        await answer(mesh, origin.name, PROMPTS[3], 24, got)
        assert got == reference(PROMPTS[3], 24)
        sent = origin.service.sent_bytes()
        assert sent.get(origin.addr, 0) == 0 and sum(sent.values()) > 0
        await until(mesh.idle, 5, "every cache freed, its own too")


@pytest.mark.parametrize("speculate", [0, 8], ids=["plain", "speculating"])
async def test_tokens_go_round_the_chain_without_the_origin(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    speculate: int,
) -> None:
    """Whether the origin runs no stage or one (here the middle one): the last stage sends
    each token straight to the first as the next step (and a copy to the origin), so the
    origin sends the first stage the prompt and nothing per token: about as many bytes for
    24 tokens as for 4 (the numbers in the prompt's step differ; a step frame of its own is
    over 100 bytes). An answer that speculates goes round too: the first stage drafts."""
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abcd")
        first, middle, last = (mesh.peers[s.device] for s in plan.stages)
        spare = next(mesh.peers[p] for p in "abcd" if plan.stage_of(NodeId(p)) is None)
        sent: dict[str, list[int]] = {spare.name: [], middle.name: []}
        fed: list[int] = []
        for origin in (spare, middle):
            for n in (4, 24):
                before = origin.service.sent_bytes().get(first.addr, 0)
                looped = last.service.sent_bytes().get(first.addr, 0)
                got: list[int] = []
                await answer(mesh, origin.name, PROMPTS[2], n, got)
                assert got == reference(PROMPTS[2], n)
                await until(mesh.idle, 5, "every cache freed")
                sent[origin.name].append(origin.service.sent_bytes().get(first.addr, 0) - before)
                fed.append(last.service.sent_bytes().get(first.addr, 0) - looped)
        for origin in (spare, middle):
            a, b = sent[origin.name]
            assert 0 < a <= b < a + 16, origin.name
            stats = origin.service.stats
            assert (stats.kept > 0) == bool(speculate), stats  # drafts the first stage made
        assert fed[1] > fed[0] > 0 and fed[3] > fed[2] > 0  # the last stage fed the first


async def test_a_lone_answer_splits_the_head_between_the_ends_token_for_token(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """One greedy answer alone: the last stage sends each step's hidden state to the first
    stage, which holds the tied head's matrix as its embedding; each scores its share of the
    vocabulary and the first feeds the better pick on. Every token is one process's; an
    answer ending on a stop token ends there; seeded and concurrent answers are not split."""
    async with SimMesh(model, memory, speculate=0) as mesh:
        plan = await three_stages(mesh, "abc")
        assert 0 < plan.head_share < 1
        first, last = mesh.peers[plan.stages[0].device], mesh.peers[plan.stages[-1].device]
        # The status predicts one answer with the split, more with the whole head.
        got = plan_flow(first.node, plan)
        now = predicted_now(first.node, plan)
        assert got is not None and now is not None
        _, flow, back, _ = got
        assert now["latency_ms"] < latency_ms(flow, back)
        assert now["tokens_per_s_at"]["1"] > round(tokens_per_s(flow, back, 1), 2)

        def splits() -> int:
            stage = last.service.follower.stage
            assert stage is not None and stage.head_rows > 0
            return stage.costs.split_steps

        for prompt in PROMPTS:
            got: list[int] = []
            await answer(mesh, first.name, prompt, 16, got)
            assert got == reference(prompt, 16)
        assert splits() >= len(PROMPTS) * 14  # every step but the prompt's and the last
        if cores.here() is not None and len(os.sched_getaffinity(0)) > 1:
            # The peers share this thread: the last stage names the core it scores its
            # share on, and the first, finding itself there, scores its own on another.
            assert first.service.follower.stage.first_head.picks_moved > 0  # type: ignore[union-attr]
        # A pass without its head measures no whole decode pass (holds, slices): apart.
        stage = last.service.follower.stage
        assert stage is not None and list(stage.costs.split_ms) == [1]  # one row each
        assert sum(stage.costs.passes.values()) <= 2 * len(PROMPTS)
        full = reference(PROMPTS[3], 16)
        stop = next(t for t in full if full.index(t) >= 4)  # a token met first a few steps in
        stopped: list[int] = []
        origin, before = first.service.origin, splits()
        async for token in origin.generate(PROMPTS[3], 16, stop_ids=frozenset({stop})):
            stopped.append(token)
        assert stopped == full[: full.index(stop)]  # the stop token ends it, unsaid
        await until(mesh.idle, 5, "every cache freed")
        # The first stage picked the stop token and fed nothing after it.
        assert splits() - before == full.index(stop)
        before = splits()
        await seeded(mesh, first.name, PROMPTS[0], 12)
        two: list[list[int]] = [[], []]
        await asyncio.gather(
            *(answer(mesh, first.name, p, 12, g) for p, g in zip(PROMPTS[:2], two, strict=True))
        )
        assert two == [reference(p, 12) for p in PROMPTS[:2]]
        assert splits() - before < 12  # the seeded answer none; the two only steps alone
        await until(mesh.idle, 5, "every cache freed")
        assert not first.service.follower.stage.first_head._picks  # no half left waiting


async def test_answers_in_one_wave_have_their_heads_scored_at_a_faster_first_stage(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """Two peers, the first five times as fast by its profile, batching well: one wave, and
    the plan has the first stage score each wave's head. Answers asked together are one
    process's token for token, their heads scored at the first stage in passes of several."""
    async with SimMesh(model, 1.5 * memory, speculate=0) as mesh:
        mesh.add("a", priority=1, unit_ms=2.0, batches=True)
        mesh.add("b", unit_ms=10.0, batches=True)
        await until(lambda: mesh.agreed(2), 20, "a 2-stage chain")
        plan = mesh.peers["a"].node.book.current
        assert plan is not None and [s.device for s in plan.stages] == ["a", "b"]
        assert plan.waves == 1 and plan.wave_head
        now = predicted_now(mesh.peers["a"].node, plan)
        got = plan_flow(mesh.peers["a"].node, replace(plan, wave_head=False))
        assert now is not None and got is not None and now["wave_head"]
        assert now["tokens_per_s_at"]["8"] > round(tokens_per_s(got.flow, got.back, 8), 2)
        last = await _answered_with_wave_heads(mesh, reference)
        assert max(last.costs.split_passes) > 1


async def test_answers_in_two_waves_have_each_waves_head_scored_at_the_first_stage(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """Two peers, the first twice as fast by its profile, passes of several rows costing a
    quarter of one's a row more: the head moved to the first stage leaves the two stages'
    passes near even, so two waves go round fastest with it, and the plan says so. Answers
    asked together are one process's token for token, each wave's head scored at the first
    stage."""
    async with SimMesh(model, 1.5 * memory, speculate=0) as mesh:
        mesh.add("a", priority=1, unit_ms=2.0, batches=True, row_share=0.25)
        mesh.add("b", unit_ms=4.0, batches=True, row_share=0.25)
        await until(lambda: mesh.agreed(2), 20, "a 2-stage chain")
        plan = mesh.peers["a"].node.book.current
        assert plan is not None and [s.device for s in plan.stages] == ["a", "b"]
        assert plan.waves == 2 and plan.wave_head
        node = mesh.peers["a"].node
        moved, plain = (plan_flow(node, replace(plan, wave_head=on)) for on in (True, False))
        assert moved is not None and plain is not None
        assert tokens_per_s(moved.flow, moved.back, 8, waves=2) > max(
            tokens_per_s(plain.flow, plain.back, 8, waves=w) for w in (1, 2)
        )
        await _answered_with_wave_heads(mesh, reference)


async def _answered_with_wave_heads(
    mesh: SimMesh, reference: Callable[[Sequence[int], int], list[int]]
) -> StageWorker:
    """PROMPTS asked together at peer a, of a chain a-b: one process's token for token, waves'
    heads scored at a, nothing left held there once the mesh is idle. b's stage returned."""
    answers: list[list[int]] = [[] for _ in PROMPTS]
    await asyncio.gather(
        *(answer(mesh, "a", p, 12, g) for p, g in zip(PROMPTS, answers, strict=True))
    )
    assert answers == [reference(p, 12) for p in PROMPTS]
    first = mesh.peers["a"].service.follower.stage
    last = mesh.peers["b"].service.follower.stage
    assert first is not None and last is not None
    assert first.first_head.wave_rows > 0
    await until(mesh.idle, 5, "every cache freed")
    assert not first.first_head._wave.rows
    return last


async def test_a_speculating_lone_answer_splits_the_head_of_its_passes_drafts_and_all(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """The first stage drafts for an answer the chain feeds itself; each pass, with a draft
    to verify or not, splits the head: the two ends pick every row, the first stage keeps
    the picks the draft confirms and feeds the next step. Tokens are one process's."""
    async with SimMesh(model, memory, speculate=8) as mesh:
        plan = await three_stages(mesh, "abc")
        first, last = mesh.peers[plan.stages[0].device], mesh.peers[plan.stages[-1].device]
        for prompt in PROMPTS:
            got: list[int] = []
            await answer(mesh, first.name, prompt, 24, got)
            assert got == reference(prompt, 24)
        stage = last.service.follower.stage
        stats = first.service.stats
        assert stage is not None and stats.kept > 0
        # Past each prompt's pass, every pass splits the head but maybe each answer's last
        # (one at its last step feeds nothing on); some of them verified drafts.
        decodes = stats.passes - len(PROMPTS)
        assert decodes - len(PROMPTS) <= stage.costs.split_steps <= decodes
        assert 1 in stage.costs.split_ms and max(stage.costs.split_ms) > 1
        await until(mesh.idle, 5, "every cache freed")
        assert not first.service.follower.stage.first_head._picks  # no half left waiting
        # The status prices such passes split too, by their rows' heads.
        spec = Speculation(positions=4.0, tokens=2.0)
        now, got = predicted_now(first.node, plan, spec), plan_flow(first.node, plan)
        assert now is not None and got is not None
        _, flow, back, _ = got
        assert now["speculating"]["latency_ms"] < latency_ms(flow, back, spec)


@pytest.mark.parametrize("speculate", [0, 8], ids=["plain", "speculating"])
async def test_a_prompt_of_many_chunks_goes_on_round_the_chain(
    model: Path,
    memory: float,
    reference: Callable[[Sequence[int], int], list[int]],
    speculate: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt sent in several frames (PREFILL_CHUNK tokens each) may wait at the first
    stage as one (its chunks joined): the chain still feeds itself after it, so the answer
    goes on without a replay or a wait for the step timeout. Every stage's frames of it say
    where it ends (how deep a slice is, chain/schedule.py); its decode steps do not."""
    sent: list[StepFrame] = []
    send = MemoryLinks.send

    async def noted(links: MemoryLinks, addr: str, frame: DataFrame) -> None:
        if isinstance(frame, StepFrame):
            sent.append(frame)
        await send(links, addr, frame)

    monkeypatch.setattr(MemoryLinks, "send", noted)
    async with SimMesh(model, memory, speculate=speculate) as mesh:
        plan = await three_stages(mesh, "abc")
        origin = plan.stages[0].device
        prompt = [(7 * i) % 90 + 1 for i in range(3 * PREFILL_CHUNK + 40)]
        got: list[int] = []
        await asyncio.wait_for(answer(mesh, origin, prompt, 12, got), 20)
        assert got == reference(prompt, 12)
        chunks = [f for f in sent if not one_token(f)]
        assert chunks and {f.ends for f in chunks} == {len(prompt)}
        assert {f.ends for f in sent if one_token(f)} == {0}
        stats = mesh.peers[origin].service.stats
        assert stats.replays == 0
        await until(mesh.idle, 5, "every cache freed")


async def test_a_token_that_overtakes_the_one_before_it_waits_for_it(
    model: Path, memory: float, reference: Callable[[Sequence[int], int], list[int]]
) -> None:
    """Two stages, the origin the last: the first stage sends its copy of a split step's
    token after the next step's pass, behind that step on their one link, and the last
    stage answers the next step itself at once. The later token reaches the origin first;
    it waits there for the earlier one (before, it was dropped, and the answer waited out
    its step timeout for it: bench_chain's 2-peer mesh, 503 "no token 63")."""
    async with SimMesh(model, 1.6 * memory, speculate=0) as mesh:
        for name in "ab":
            mesh.add(name)
        await until(lambda: mesh.agreed(2), 20, "a 2-stage chain")
        plan = mesh.peers["a"].node.book.current
        assert plan is not None and 0 < plan.head_share < 1
        mesh.data.delay = 0.002  # a link that yields between frames, as a socket's reads do
        for prompt in PROMPTS[:3]:
            got: list[int] = []
            await answer(mesh, plan.stages[-1].device, prompt, 8, got)
            assert got == reference(prompt, 8)
