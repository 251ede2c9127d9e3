"""The data plane of one peer: follows plans, serves /chain/ws, and runs sessions for requests
that arrive here (the origin).

Plans change make-before-break: a peer loads its shard for a new plan while its old stage
keeps serving, and switches when the whole new chain is ready (or the first frame of the new
epoch arrives). Caches of layers a peer keeps stay where they are; caches of layers that move
are handed to their new owners when the origin asks (KV handoff), and replayed from the
origin's token history only when their owner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import torch
from aiohttp import web

from meshshard.chain.admission import KVBudget
from meshshard.chain.handoff import LeftBehind, moves
from meshshard.chain.links import (
    FrameCodec,
    LinkError,
    Links,
    Refusals,
    accept_token,
    read_frames,
)
from meshshard.chain.meter import TokenMeter
from meshshard.chain.stage import Observe, StageWorker
from meshshard.chain.tensors import from_wire, to_wire
from meshshard.chain.worker import run_model
from meshshard.delays import NONE, Delays
from meshshard.edge.serve import names_of
from meshshard.mesh.node import ControlNode
from meshshard.mesh.types import PlanRecord
from meshshard.model.costs import DTYPE_BYTES
from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard
from meshshard.model.spec import ModelSpec
from meshshard.wire import (
    DataFrame,
    DropFrame,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    Sampling,
    StepFrame,
    TokenFrame,
    WireError,
)

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per frame, so a long prompt does not hold a stage long
STEP_TIMEOUT = 120.0  # seconds to wait for one token before giving up on a session
READY_TIMEOUT = 120.0
MAX_REPLAYS = 8  # chain breaks one session survives
PLAN_POLL = 0.05  # how often a waiting session checks whether its plan still stands
SAME_PLAN_GRACE = 3.0  # after a break, wait this long for a newer plan before retrying
NOT_READY_RETRY = 0.2  # ... but a stage that is not ready yet only needs a moment
HANDOFF_TIMEOUT = 10.0  # seconds the origin waits for KV handoffs before replaying instead
SWEEP_SECONDS = 2.0  # how often a stage frees caches of sessions whose origin is gone
SESSION_IDLE = 600.0  # a session with no step for this long is freed (its origin lost track)
ENDED_REMEMBERED = 4096  # dropped sessions a stage remembers, to ignore their late frames
BUSY_RETRY_SECONDS = 2  # what a refused caller is told to wait (sessions take seconds)


class ChainError(Exception):
    """A session could not complete: no chain, a stage refused it, or a peer vanished."""


class ChainBusy(ChainError):
    """A stage cannot hold another session's KV cache now; worth asking again later."""

    retry_after = BUSY_RETRY_SECONDS


class _Broken(Exception):
    """The plan a session runs on can no longer serve it; resume on the next one, or on the
    same one after `grace` seconds if no newer one comes."""

    def __init__(self, message: str, grace: float = SAME_PLAN_GRACE) -> None:
        super().__init__(message)
        self.grace = grace


class _Short(Exception):
    """A stage holds fewer positions than the origin fed from: feed again from `have`."""

    def __init__(self, have: int) -> None:
        self.have = have


@dataclass
class _Prepared:
    """A plan this peer has loaded for and will switch to: its shard (None when the plan
    gives it no units) and the next stage's address."""

    plan: PlanRecord
    shard: Shard | None
    next_addr: str | None


@dataclass
class Usage:
    """What one session did, for the caller: timing and the epoch it ran under."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    epoch: tuple[int, str] = (0, "")


class ChainService:
    def __init__(
        self,
        control: ControlNode,
        model_dir: Path,
        dtype: str,
        session: aiohttp.ClientSession,
        spec: ModelSpec,
        codec: FrameCodec,
        delays: Delays = NONE,
    ) -> None:
        self.control = control
        self.codec = codec
        self.delays = delays
        self.refusals = Refusals()
        self.model_dir = model_dir
        self.dtype = dtype
        self.spec = spec
        self.stage: StageWorker | None = None
        self.budget = KVBudget(None)  # the serving stage's KV memory, reserved by sessions
        self.busy = 0  # new sessions this peer's stage refused for want of memory
        self._http = session
        self._plans: asyncio.Queue[PlanRecord] = asyncio.Queue()
        self._pending: _Prepared | None = None
        self._switch = asyncio.Lock()
        self._wake = asyncio.Event()
        self._left = LeftBehind()
        self._seen: dict[str, tuple[str, float]] = {}  # session -> (origin, last step time)
        self._kv_in: dict[tuple[str, int], int] = {}  # (session, attempt) -> layers received
        self._handed: dict[str, set[int]] = {}  # layers handed off before we switched plans
        self._sessions: dict[str, asyncio.Queue[DataFrame]] = {}
        # Session ids never repeat, across restarts too: a stage remembers ended ones.
        self._ids = (f"{control.id}/{secrets.token_hex(3)}.{n}" for n in itertools.count())
        self._ended: OrderedDict[str, None] = OrderedDict()  # sessions dropped here
        self._links: Links | None = None
        self._stage_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._inbound: set[web.WebSocketResponse] = set()
        self.accepting = True
        self.tokens_out = 0
        self.replays = 0  # feeds that went back over tokens already fed (a cache was lost)
        self.handoffs = 0  # KV handoffs completed for sessions of this origin
        self.kv_layers_sent = 0
        self.kv_layers_received = 0
        self.sessions_started = 0
        self._steps_before = 0
        self.meter = TokenMeter()
        self.on_step: Observe | None = None  # told of every batch our stages run

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._links = Links(
                self._http, self.handle_frame, tg, self.codec, self.refusals, self.delays
            )
            sweeper = tg.create_task(self._sweep_loop())
            try:
                while True:
                    plan = await self._plans.get()
                    while not self._plans.empty():
                        plan = self._plans.get_nowait()  # only the newest matters
                    try:
                        await self._prepare(plan)
                    except Exception as e:  # a shard that fails to load must not end the peer
                        logger.error(
                            "[%s] cannot serve epoch %s: %s", self.control.id, plan.epoch, e
                        )
                        continue
                    await self._await_switch(plan)
            finally:
                sweeper.cancel()
                await self._stop_stage()
                await self._links.close()
                for ws in list(self._inbound):  # or the HTTP server waits for them to end
                    await ws.close()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def left_behind(self) -> LeftBehind:
        return self._left

    def on_plan(self, plan: PlanRecord) -> None:
        self._plans.put_nowait(plan)
        self._wake.set()

    async def drain(self, deadline: float) -> None:
        """Stop taking requests and wait (until `deadline` seconds) for running sessions."""
        self.accepting = False
        end = time.monotonic() + deadline
        while self._sessions and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def hand_over(self, deadline: float) -> bool:
        """Leaving: wait (until `deadline` seconds) for a plan without us to take over and for
        the caches we held to be handed off or freed. False if the mesh could not take over."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.stage is None and self._pending is None and not len(self._left):
                return True
            if not self.control.plan_possible():
                return False  # nobody (or not enough memory) to take over
            await asyncio.sleep(0.05)
        return False

    # -- plans -------------------------------------------------------------------------------

    async def _prepare(self, plan: PlanRecord) -> None:
        """Load what `plan` asks of this peer, while the current stage keeps serving."""
        me = self.control.id
        mine = plan.stage_of(me)
        if mine is None:
            self._pending = _Prepared(plan, None, None)
            self.control.set_ready(plan.epoch)
            return
        index = plan.stages.index(mine)
        nxt = plan.stages[index + 1].device if index + 1 < len(plan.stages) else None
        next_addr = self.control.addr_of(nxt) if nxt is not None else None
        if nxt is not None and next_addr is None:
            logger.warning("next stage %s is not a live member; waiting for a new plan", nxt)
            return
        units = (mine.start, mine.end)
        reusable = [p.shard for p in (self.stage, self._pending) if p is not None and p.shard]
        shard = next((s for s in reusable if (s.start, s.end) == units), None)
        if shard is None:
            started = time.monotonic()
            shard = await run_model(Shard.load, self.model_dir, mine.start, mine.end, self.dtype)
            self.control.events.add(
                "shard",
                f"loaded units {mine.start}..{mine.end - 1} ({shard.weight_bytes() / 1e6:.0f} MB)"
                f" in {time.monotonic() - started:.1f} s for epoch {plan.epoch}",
            )
        self._pending = _Prepared(plan, shard, next_addr)
        if self.control.book.current == plan:
            self.control.set_ready(plan.epoch)

    async def _await_switch(self, plan: PlanRecord) -> None:
        """Switch to `plan` once its whole chain is ready, unless a newer plan comes first."""
        while self._pending is not None and self._pending.plan == plan:
            if not self._plans.empty():
                return
            if self.control.chain_ready(plan) or self.stage is None:
                await self._switch_to(plan)
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLAN_POLL):
                    await self._wake.wait()

    async def _switch_to(self, plan: PlanRecord) -> None:
        async with self._switch:
            pending = self._pending
            if pending is None or pending.plan != plan:
                return
            self._pending = None
            old, task = self.stage, self._stage_task
            if old is not None and task is not None:
                await old.close(f"this stage moved to epoch {plan.epoch}")
                await task
                self._steps_before += old.steps
            caches: dict[str, KVCache] = {}
            if old is not None and old.shard is not pending.shard:
                caches = await run_model(old.shard.take_caches)
            if pending.shard is not None and caches:
                caches = await run_model(pending.shard.adopt, caches)
            for session, layers in self._handed.items():  # their new owners have them
                if session in caches:
                    caches[session].split(layers)
            self._handed.clear()
            caches = {s: c for s, c in caches.items() if c.layers}
            self._left.add(caches)
            self.budget = self._budget(pending.shard).carry(self.budget)
            if pending.shard is None:
                self.stage, self._stage_task = None, None
            else:
                assert self._tg is not None and self._links is not None
                self.stage = StageWorker(
                    pending.shard, plan.epoch, pending.next_addr, self._links.send, self.on_step
                )
                self._stage_task = self._tg.create_task(self.stage.run())
            shard = pending.shard
            units = f"units {shard.start}..{shard.end - 1}" if shard else "no units"
            self.control.events.add(
                "shard",
                f"now serving epoch {plan.epoch}: {units}; "
                f"{len(caches)} sessions' caches left behind for handoff",
            )

    def _budget(self, shard: Shard | None) -> KVBudget:
        if shard is None:
            return KVBudget(None)
        size = DTYPE_BYTES[self.dtype]
        per_token = sum(
            self.spec.kv_bytes_per_token(u, size) for u in range(shard.start, shard.end)
        )
        memory = self.control.profiles[self.control.id].mem
        return KVBudget.of_stage(memory, shard.weight_bytes(), per_token)

    @property
    def stage_steps(self) -> int:
        """Steps run by this peer's stages, the one serving now and those before it."""
        return self._steps_before + (self.stage.steps if self.stage else 0)

    def sent_bytes(self) -> dict[str, int]:
        return dict(self._links.sent_bytes) if self._links else {}

    async def _stop_stage(self) -> None:
        if self.stage is not None and self._stage_task is not None:
            await self.stage.close("this peer is stopping")
            await self._stage_task
        self._stage_task = None
        self.stage = None

    # -- frames ------------------------------------------------------------------------------

    async def handle_frame(self, frame: DataFrame) -> None:
        match frame:
            case StepFrame() | KVFrame() if frame.session in self._ended:
                return  # late news of an answer its origin ended: nothing to hold for it
            case StepFrame():
                pending = self._pending
                if pending is not None and pending.plan.epoch == frame.epoch:
                    await self._switch_to(pending.plan)  # the origin saw the new chain ready
                elif self._switch.locked():
                    async with self._switch:  # a switch under way: serve from its outcome
                        pass
                stage = self.stage
                if stage is None or stage.epoch != frame.epoch:
                    current = self.control.book.epoch
                    stale = current is not None and frame.epoch < current
                    code = "stale-epoch" if stale else "not-ready"
                    await self._reply_error(frame, code, f"this peer serves epoch {current}")
                    return
                positions = max(frame.reserve, frame.start + frame.tensor.shape[0])
                new = frame.start == 0 and frame.attempt == 0 and frame.step == 0
                if not self.budget.admit(frame.session, positions, new):
                    self.busy += 1
                    budget = f"{self.budget.reserved} of {self.budget.tokens}"
                    await self._reply_error(
                        frame,
                        "busy",
                        f"{self.control.id} has KV cache reserved for {budget} tokens",
                    )
                    return
                self._seen[frame.session] = (frame.origin, time.monotonic())
                await stage.put(frame)
            case DropFrame():
                await self._forget(frame.session)
            case HandoffRequest():
                assert self._tg is not None
                self._tg.create_task(self._hand_off(frame))
            case KVFrame():
                await self._take_kv(frame)
            case TokenFrame() | ErrorFrame() | HandoffDone():
                queue = self._sessions.get(frame.session)
                if queue is not None:
                    queue.put_nowait(frame)

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        names = names_of(request, self.control.membership.me.addr)
        token = accept_token(request, self.codec.sealer, names)
        ws = web.WebSocketResponse(
            max_msg_size=self.codec.max_message, heartbeat=10, compress=False
        )
        await ws.prepare(request)
        self._inbound.add(ws)
        channel = self.codec.channel(token, outbound=False)
        try:
            await read_frames(ws, channel, self.refusals, request.remote, self.handle_frame)
        finally:
            self._inbound.discard(ws)
        return ws

    async def _reply_error(self, frame: StepFrame, code: str, message: str) -> None:
        error = ErrorFrame(frame.epoch, frame.session, frame.step, code, message, frame.attempt)
        await self._tell(frame.origin, error)

    async def _tell(self, addr: str, frame: DataFrame) -> None:
        with contextlib.suppress(LinkError):
            assert self._links is not None
            await self._links.send(addr, frame)

    # -- KV handoff (this peer as old or new owner) ------------------------------------------

    async def _hand_off(self, req: HandoffRequest) -> None:
        """Send the session's cache for the requested units to their new owner."""
        layers = [
            layer
            for unit in range(req.start, min(req.end, self.spec.num_units))
            if (layer := self.spec.layer_of(unit)) is not None
        ]
        async with self._switch:  # mid-switch, caches are between the shard and left-behind
            exported = await run_model(self._export, req.session, layers, req.length)
        refusal = ErrorFrame(req.epoch, req.session, 0, "no-handoff", "", req.attempt)
        if not exported:
            message = f"{self.control.id} holds no cache of units {req.start}..{req.end - 1}"
            await self._tell(req.origin, replace(refusal, message=message))
            return
        assert self._links is not None
        try:
            for i, (layer, keys, values) in enumerate(exported):
                kv = KVFrame(
                    req.epoch,
                    req.session,
                    req.attempt,
                    layer,
                    to_wire(keys),
                    to_wire(values),
                    req.origin,
                    final=i == len(exported) - 1,
                )
                await self._links.send(req.to, kv)
        except LinkError as e:
            await self._tell(req.origin, replace(refusal, message=f"handoff failed: {e}"))
            return
        self.kv_layers_sent += len(exported)
        # Handed over: our copy is no longer anyone's (once we stop serving those layers).
        moved = {layer for layer, _, _ in exported}
        self._handed.setdefault(req.session, set()).update(moved)
        left = self._left.get(req.session)
        if left is not None:
            left.split(moved)
            if not left.layers:
                self._left.drop(req.session)

    def _export(
        self, session: str, layers: list[int], length: int
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Copies of the session's cache for `layers`, from wherever this peer holds them."""
        out = []
        shard = self.stage.shard if self.stage is not None else None
        left = self._left.get(session)
        for layer in layers:
            kv = shard.export(session, layer, length) if shard is not None else None
            if kv is None and left is not None and left.has(layer):
                keys, values = left.layer(layer, length)
                kv = (keys.clone(), values.clone())
            if kv is not None:
                out.append((layer, *kv))
        return out

    async def _take_kv(self, frame: KVFrame) -> None:
        stage, pending = self.stage, self._pending
        shard = None
        if stage is not None and stage.epoch == frame.epoch:
            shard = stage.shard
        elif pending is not None and pending.plan.epoch == frame.epoch:
            shard = pending.shard
        refusal = ErrorFrame(frame.epoch, frame.session, 0, "no-handoff", "", frame.attempt)
        if shard is None:
            message = f"{self.control.id} serves no units in epoch {frame.epoch}"
            await self._tell(frame.origin, replace(refusal, message=message))
            return
        try:
            keys, values = from_wire(frame.keys), from_wire(frame.values)
            await run_model(shard.install, frame.session, frame.layer, keys, values)
        except (ValueError, WireError) as e:
            await self._tell(frame.origin, replace(refusal, message=f"bad handoff: {e}"))
            return
        self.kv_layers_received += 1
        self._seen[frame.session] = (frame.origin, time.monotonic())
        key = (frame.session, frame.attempt)
        self._kv_in[key] = self._kv_in.get(key, 0) + 1
        if frame.final:
            done = HandoffDone(frame.epoch, frame.session, frame.attempt, self._kv_in.pop(key))
            await self._tell(frame.origin, done)

    # -- freeing caches ----------------------------------------------------------------------

    async def _forget(self, session: str) -> None:
        self._seen.pop(session, None)
        self.budget.release(session)
        self._ended[session] = None
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        # Mid-switch a cache is in neither shard nor left-behind list (it is being adopted):
        # a drop then would miss it, and the new shard would keep it until SESSION_IDLE.
        async with self._switch:
            self._left.drop(session)
            shards = {id(s): s for s in self._shards()}
            for shard in shards.values():
                await run_model(shard.drop, session)

    def _shards(self) -> list[Shard]:
        pending = self._pending.shard if self._pending is not None else None
        stage = self.stage.shard if self.stage is not None else None
        return [s for s in (stage, pending) if s is not None]

    async def _sweep_loop(self) -> None:
        """Free what no one will ask for: sessions whose origin left the mesh or went quiet,
        and left-behind caches past their time."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._left.expire()
            live = {m.addr for m in self.control.membership.live()}
            now = time.monotonic()
            held = {str(s) for shard in self._shards() for s in shard.sessions}
            for session in held - self._seen.keys():
                self._seen[session] = ("", now)  # learnt by handoff or a race: start a clock
            for session, (origin, last) in list(self._seen.items()):
                gone = origin and origin not in live
                if gone or now - last > SESSION_IDLE:
                    why = "its origin left the mesh" if gone else "it went quiet"
                    self.control.events.add("session", f"freed session {session}: {why}")
                    await self._forget(session)

    # -- sessions (this peer as origin) ------------------------------------------------------

    async def ready_plan(
        self,
        timeout: float = READY_TIMEOUT,
        newer_than: PlanRecord | None = None,
        grace: float = SAME_PLAN_GRACE,
    ) -> PlanRecord:
        """The plan in force once its chain is ready. After a break (`newer_than`), prefer a
        newer plan; the same one is retried only if it stays ready for a while."""
        start = time.monotonic()
        end = start + timeout
        while True:
            plan = self.control.book.current
            retry_same = newer_than is None or time.monotonic() - start > grace
            usable = plan is not None and (plan != newer_than or retry_same)
            if plan is not None and usable and self.control.chain_ready(plan):
                return plan
            if time.monotonic() > end:
                why = self.control.plan_error or "the chain is not ready"
                raise ChainError(f"no usable chain after {timeout:.0f} s: {why}")
            await asyncio.sleep(0.05)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: tuple[float, float, int | None] = (0.0, 1.0, None),
        stop_ids: frozenset[int] = frozenset(),
        usage: Usage | None = None,
    ) -> AsyncGenerator[int, None]:
        """Stream new token ids for a prompt through the mesh.

        When the plan changes under a session, it moves to the new chain: caches of units that
        moved come from their old owners (KV handoff); what cannot (the owner died) is rebuilt
        by feeding the session's token history again (the origin always keeps it). The caller
        sees one uninterrupted stream, and with greedy or seeded sampling the same tokens as if
        nothing had happened.
        """
        if not self.accepting:
            raise ChainError("this peer is shutting down")
        if not prompt_ids:
            raise ChainError("empty prompt")
        usage = usage or Usage()
        started = time.monotonic()
        temperature, top_p, seed = sampling
        params = Sampling(temperature, top_p, seed if seed is not None else secrets.randbits(62))
        session = next(self._ids)
        reserve = len(prompt_ids) + max_tokens
        queue: asyncio.Queue[DataFrame] = asyncio.Queue()
        self._sessions[session] = queue
        self.sessions_started += 1
        history = list(prompt_ids)
        produced = 0
        usage.prompt_tokens = len(prompt_ids)
        broken: PlanRecord | None = None
        grace = SAME_PLAN_GRACE
        used: list[PlanRecord] = []
        try:
            for attempt in range(MAX_REPLAYS + 1):
                plan = await self.ready_plan(newer_than=broken, grace=grace)
                usage.epoch = (plan.epoch.term, plan.epoch.coordinator)
                # Every stage of the last plan holds all but the newest token (not yet fed).
                cached = len(history) - 1 if produced else 0
                if used and used[-1] != plan:
                    self.control.events.add(
                        "session",
                        f"session {session} moves to epoch {plan.epoch} at {len(history)} tokens",
                    )
                    if cached:
                        await self._move_caches(used[-1], plan, session, attempt, cached, queue)
                if plan not in used:
                    used.append(plan)
                try:
                    run = self._attempt(
                        plan, session, attempt, queue, history, produced, cached, params, reserve
                    )
                    async with contextlib.aclosing(run) as tokens:
                        async for token in tokens:
                            if produced == 0:
                                usage.ttft_s = time.monotonic() - started
                            if token in stop_ids:
                                return
                            produced += 1
                            usage.completion_tokens = produced
                            self.tokens_out += 1
                            self.meter.token(session)
                            history.append(token)
                            yield token
                            if produced == max_tokens:
                                return
                except _Broken as e:
                    self.control.events.add("session", f"session {session} interrupted: {e}")
                    broken, grace = plan, e.grace
            raise ChainError(f"the chain broke {MAX_REPLAYS + 1} times; giving up")
        finally:
            usage.elapsed_s = time.monotonic() - started
            del self._sessions[session]
            self.meter.end(session)
            # Freeing caches must not hold up the caller (a dead stage may take a while to fail).
            assert self._tg is not None
            self._tg.create_task(self._drop(used, session))

    async def _attempt(
        self,
        plan: PlanRecord,
        session: str,
        attempt: int,
        queue: asyncio.Queue[DataFrame],
        history: list[int],
        step: int,
        start: int,
        params: Sampling,
        reserve: int,
    ) -> AsyncGenerator[int, None]:
        """Run a session on one plan from position `start` (what its stages are believed to
        hold), decoding until the caller stops. Raises _Broken when the plan can no longer
        serve it, or when a newer chain is ready to take it over."""
        me = self.control.membership.me.addr
        first = self.control.addr_of(plan.stages[0].device)
        if first is None:
            raise _Broken("the first stage is gone")
        while True:
            if self._moved_on(plan):
                raise _Broken(f"moving to the ready chain of epoch {self.control.book.epoch}")
            ids = torch.tensor(history[start:], dtype=torch.int64)
            for offset in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[offset : offset + PREFILL_CHUNK]
                last = offset + PREFILL_CHUNK >= len(ids)
                frame = StepFrame(
                    plan.epoch, session, step, start + offset, to_wire(chunk), me, last,
                    params, attempt, reserve,
                )  # fmt: skip
                await self._send(first, frame)
            try:
                token = await self._next_token(queue, plan, attempt, step, start)
            except _Short as short:
                self.control.events.add(
                    "replay",
                    f"session {session}: a stage holds {short.have} of {start} positions; "
                    "feeding again",
                )
                self.replays += 1
                start = short.have
                continue
            yield token  # the caller appends it to `history` before resuming us
            step += 1
            start = len(history) - 1

    def _moved_on(self, plan: PlanRecord) -> bool:
        """A newer plan's chain is ready: sessions should move to it between steps."""
        current = self.control.book.current
        return (
            current is not None and current.epoch > plan.epoch and self.control.chain_ready(current)
        )

    async def _next_token(
        self,
        queue: asyncio.Queue[DataFrame],
        plan: PlanRecord,
        attempt: int,
        step: int,
        start: int,
    ) -> int:
        waited = 0.0
        while True:
            try:
                async with asyncio.timeout(PLAN_POLL):
                    frame = await queue.get()
            except TimeoutError:
                waited += PLAN_POLL
                if self._moved_on(plan):
                    raise _Broken(f"the plan moved on to epoch {self.control.book.epoch}") from None
                if any(self.control.addr_of(s.device) is None for s in plan.stages):
                    raise _Broken("a stage left the mesh") from None
                if waited > STEP_TIMEOUT:
                    raise ChainError(f"no token {step} within {STEP_TIMEOUT:.0f} s") from None
                continue
            match frame:
                case TokenFrame(attempt=a, step=s) if a == attempt and s == step:
                    return frame.token
                case ErrorFrame(attempt=a) if a == attempt:
                    if frame.code in ("cache-miss", "unknown-session"):
                        if frame.have < start:
                            raise _Short(frame.have)
                        continue  # a later chunk of a feed already sent again
                    if frame.code == "no-handoff":
                        continue  # late news of the handoff phase: a gap shows as a cache miss
                    if frame.code == "bad-frame":
                        raise ChainError(f"{frame.code}: {frame.message}")
                    if frame.code == "busy":
                        raise ChainBusy(frame.message)
                    # A stage still switching to this plan will serve it in a moment.
                    grace = NOT_READY_RETRY if frame.code == "not-ready" else SAME_PLAN_GRACE
                    raise _Broken(f"{frame.code}: {frame.message}", grace)

    async def _move_caches(
        self,
        old: PlanRecord,
        new: PlanRecord,
        session: str,
        attempt: int,
        length: int,
        queue: asyncio.Queue[DataFrame],
    ) -> None:
        """Ask the old owners of units that moved to hand their caches to the new owners, and
        wait until they have (or cannot: then the feed finds the gap and replays)."""
        me = self.control.membership.me.addr
        planned = moves(old, new, self.spec.num_units)
        if any(self.control.addr_of(m.source) is None for m in planned):
            return  # a cache died with its owner: the whole chain replays, handoffs are moot
        sources = []
        for move in planned:
            source, target = self.control.addr_of(move.source), self.control.addr_of(move.target)
            if source is None or target is None:
                continue
            req = HandoffRequest(
                new.epoch, session, attempt, move.start, move.end, length, target, me
            )
            try:
                await self._links_send(source, req)
            except LinkError:
                continue
            sources.append(move.source)
        waiting = len(sources)
        started = time.monotonic()
        while waiting:
            try:
                async with asyncio.timeout(PLAN_POLL):
                    frame = await queue.get()
            except TimeoutError:
                alive = all(self.control.addr_of(n) is not None for n in sources)
                if not alive or time.monotonic() - started > HANDOFF_TIMEOUT:
                    self.control.events.add("handoff", f"session {session}: handoff incomplete")
                    return
                continue
            match frame:
                case HandoffDone(attempt=a) if a == attempt:
                    waiting -= 1
                    self.handoffs += 1
                    self.control.events.add(
                        "handoff",
                        f"session {session}: KV cache of {length} positions handed over "
                        f"for epoch {new.epoch}",
                    )
                case ErrorFrame(attempt=a, code="no-handoff") if a == attempt:
                    self.control.events.add("handoff", f"session {session}: {frame.message}")
                    waiting -= 1

    async def _links_send(self, addr: str, frame: DataFrame) -> None:
        assert self._links is not None
        await self._links.send(addr, frame)

    async def _send(self, addr: str, frame: DataFrame) -> None:
        try:
            await self._links_send(addr, frame)
        except LinkError as e:
            raise _Broken(str(e)) from None

    async def _drop(self, plans: list[PlanRecord], session: str) -> None:
        nodes = {stage.device for plan in plans for stage in plan.stages}
        epoch = plans[-1].epoch if plans else None
        for node in sorted(nodes):
            addr = self.control.addr_of(node)
            if addr is not None and epoch is not None:
                with contextlib.suppress(LinkError):
                    await self._links_send(addr, DropFrame(epoch, session))
