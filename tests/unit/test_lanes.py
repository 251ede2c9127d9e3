"""A link's two sockets: a prompt's activations by one, decode steps and tokens by the other,
so a step never waits behind a prompt's bytes (real sockets on loopback)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from socket import SOL_SOCKET
from types import SimpleNamespace

import aiohttp
import pytest
import torch
from aiohttp import web
from support.dataplane import Unwatched, ignore

from meshshard.chain import links as links_module
from meshshard.chain.channel import RECORD_BYTES, FrameCodec
from meshshard.chain.lanes import (
    BULK,
    MAX_PACE,
    PACE_SHARE,
    SO_MAX_PACING_RATE,
    STEPS,
    fitted,
    lane,
    pace_rate,
)
from meshshard.chain.links import (
    Dispatch,
    LinkError,
    Links,
    LinkWatch,
    Refusals,
    SocketServer,
    read_frames,
)
from meshshard.chain.tensors import to_wire
from meshshard.security import Keyring, Sealer, new_key
from meshshard.types import Epoch
from meshshard.wire import (
    DataFrame,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    KVFrame,
    Sampling,
    StepFrame,
    TokenFrame,
    encode_frame,
)

EPOCH = Epoch(1, "a")
HIDDEN = 8
PORT = 7598
ADDR = f"127.0.0.1:{PORT}"
ORIGIN = "127.0.0.1:1"


def step(session: str, rows: int, draft: tuple[int, ...] = (), hidden: int = HIDDEN) -> StepFrame:
    tensor = to_wire(torch.randn(rows + len(draft), hidden))
    return StepFrame(EPOCH, session, 0, 0, tensor, ORIGIN, True, Sampling(0.0, 1.0, 0), draft=draft)


def test_prompts_and_caches_go_by_the_bulk_socket_and_steps_by_the_other() -> None:
    assert lane(step("s", 64)) == BULK  # a prompt's rows (or a feed after a replay)
    assert lane(step("s", 1)) == STEPS  # a decode step
    assert lane(step("s", 1, draft=(4, 5, 6))) == STEPS  # ... with a draft to verify
    assert lane(TokenFrame(EPOCH, "s", 3, (7,))) == STEPS
    cache = to_wire(torch.zeros(1, 1, 4, 2))
    assert lane(KVFrame(EPOCH, "s", 0, 1, cache, cache, ORIGIN, True)) == BULK
    assert lane(DropFrame(EPOCH, "s")) == BULK  # behind the session's prompt, never before it


async def test_a_step_is_not_held_behind_a_prompt_on_its_link() -> None:
    """The receiver is still taking in a prompt's activations (as while a slow link carries
    them: it reads no further on that socket); a decode step sent after them arrives
    meanwhile. On one socket per link it would wait behind them."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN)
    step_in = asyncio.Event()
    arrived: list[str] = []

    async def dispatch(frame: DataFrame) -> None:
        assert isinstance(frame, StepFrame)
        arrived.append(frame.session)
        if lane(frame) == BULK:
            await asyncio.wait_for(step_in.wait(), 3)
        else:
            step_in.set()

    async with linked(codec, dispatch) as links:
        await links.send(ADDR, step("prompt", 2000))
        while not arrived:  # the receiver is taking the prompt in
            await asyncio.sleep(0.01)
        await links.send(ADDR, step("decoding", 1))
        await asyncio.wait_for(step_in.wait(), 3)
    assert arrived == ["prompt", "decoding"]


async def test_a_frame_of_whole_records_crosses_a_socket_intact() -> None:
    """A frame past a mebibyte goes as records of exactly the largest size a socket reads
    (a long prompt's rows: 455 and more of hidden 576). aiohttp refuses a message of exactly
    its limit: the socket closed under them and the frame was lost (seen in the bench)."""
    hidden = 576
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=hidden)
    rows = 3 * RECORD_BYTES // (4 * hidden) + 2  # three whole records and a piece of a fourth
    frames = [step("long", rows, hidden=hidden), step("next", 1, hidden=hidden)]
    records = codec.channel(b"t" * 16, outbound=True).seal(frames[0])
    assert [len(r) == codec.max_message for r in records] == [True, True, True, False]
    arrived: list[DataFrame] = []
    done = asyncio.Event()

    async def dispatch(frame: DataFrame) -> None:
        arrived.append(frame)
        if len(arrived) == len(frames):
            done.set()

    async with linked(codec, dispatch) as links:
        for frame in frames:
            await links.send(ADDR, frame)
        await asyncio.wait_for(done.wait(), 5)
    assert sorted(arrived, key=lambda f: f.session) == frames  # by two sockets, any order


async def test_a_socket_closed_under_its_frames_tells_their_origins() -> None:
    """The receiver refuses a message and closes the socket: the frame is gone, and with it
    whatever its buffers held. Every answer the socket carried hears "internal" for its
    latest try, as when a send fails, and its origin feeds it again (before, it waited for
    its step timeout and failed)."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN, me=ORIGIN)
    strict = replace(codec, max_frame_bytes=1 << 16)  # reads no message past 64 KiB
    sessions: list[str] = []
    told: list[ErrorFrame] = []
    closed = asyncio.Event()

    async def dispatch(frame: DataFrame) -> None:
        sessions.append(frame.session)

    async def back(frame: DataFrame) -> None:  # frames for this peer, the answers' origin
        assert isinstance(frame, ErrorFrame)
        told.append(frame)
        if len(told) == 2:
            closed.set()

    async with linked(codec, dispatch, receiver=strict, back=back) as links:
        await links.send(ADDR, replace(step("delivered", 2), attempt=2))  # by bulk too
        await links.send(ADDR, replace(step("refused", 4000), attempt=5))
        await asyncio.wait_for(closed.wait(), 5)
    assert sessions == ["delivered"]
    assert sorted((e.session, e.attempt, e.code) for e in told) == [
        ("delivered", 2, ErrorCode.INTERNAL),
        ("refused", 5, ErrorCode.INTERNAL),
    ]
    assert all("closed under" in e.message and "1009" in e.message for e in told)


async def test_an_answer_its_origin_ended_is_not_told_of_a_socket_closing_later() -> None:
    """The origin's drop ends an answer, here sent by these links (an origin's), or arriving
    at a stage's peer (the service tells its links to forget it): a socket that carried its
    frames and closes later says nothing of it, but still of the answers that go on."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN, me=ORIGIN)
    strict = replace(codec, max_frame_bytes=1 << 16)
    told: list[ErrorFrame] = []
    closed = asyncio.Event()

    async def back(frame: DataFrame) -> None:
        assert isinstance(frame, ErrorFrame)
        told.append(frame)
        closed.set()

    async with linked(codec, ignore, receiver=strict, back=back) as links:
        for session in ("ended", "dropped here", "live"):
            await links.send(ADDR, step(session, 1))
        await links.send(ADDR, DropFrame(EPOCH, "ended"))
        links.forget("dropped here")
        # A decode step past the receiver's limit: refused, it closes the steps socket.
        await links.send(ADDR, step("refused", 1, hidden=20_000))
        await asyncio.wait_for(closed.wait(), 5)
        await asyncio.sleep(0.2)
    assert sorted(e.session for e in told) == ["live", "refused"]


async def test_a_frame_refused_by_its_receiver_tells_the_origins() -> None:
    """The receiver takes frames of at most 2 MiB; the sender does not know (a peer whose
    profile says no limit): a prompt's 3 MiB goes as records the socket reads, and the frame
    is refused at its third. The receiver closes the socket, so the answers it carried are
    fed again. Before, it skipped the frame's records and kept the socket: nobody told the
    origin, whose answer waited out its step timeout."""
    hidden = 576
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=hidden, me=ORIGIN)
    receiver = replace(codec, max_frame_bytes=2 << 20)
    arrived: list[str] = []
    told: list[ErrorFrame] = []
    done = asyncio.Event()

    async def dispatch(frame: DataFrame) -> None:
        arrived.append(frame.session)

    async def back(frame: DataFrame) -> None:
        assert isinstance(frame, ErrorFrame)
        told.append(frame)
        if len(told) == 2:
            done.set()

    rows = 3 * RECORD_BYTES // (4 * hidden)
    async with linked(codec, dispatch, receiver=receiver, back=back) as links:
        await links.send(ADDR, replace(step("delivered", 2, hidden=hidden), attempt=1))
        await links.send(ADDR, replace(step("refused", rows, hidden=hidden), attempt=3))
        await asyncio.wait_for(done.wait(), 5)
    assert arrived == ["delivered"]
    assert sorted((e.session, e.attempt, e.code) for e in told) == [
        ("delivered", 1, ErrorCode.INTERNAL),
        ("refused", 3, ErrorCode.INTERNAL),
    ]
    assert all("1008" in e.message for e in told)


async def test_frames_to_a_peer_that_takes_less_are_cut_to_its_limit() -> None:
    """The receiver takes frames of at most 64 KiB (its --max-frame, said in its profile);
    the sender, set to 64 MiB, cuts a prompt's 128 KiB of activations to fit it. Cut only to
    its own limit, it sent them whole: refused, and the answer waited for nothing."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN, me=ORIGIN)
    strict = replace(codec, max_frame_bytes=1 << 16)
    frame = step("long", 4000)
    arrived: list[StepFrame] = []
    done = asyncio.Event()

    async def dispatch(got: DataFrame) -> None:
        assert isinstance(got, StepFrame)
        arrived.append(got)
        if got.sample:
            done.set()

    watch = Unwatched()
    watch.frame_limit = lambda address: strict.max_frame_bytes  # type: ignore[method-assign]
    async with linked(codec, dispatch, receiver=strict, watch=watch) as links:
        await links.send(ADDR, frame)
        await asyncio.wait_for(done.wait(), 5)
    assert len(arrived) > 1 and b"".join(f.tensor.data for f in arrived) == frame.tensor.data


@asynccontextmanager
async def linked(
    codec: FrameCodec,
    dispatch: Dispatch,
    receiver: FrameCodec | None = None,
    back: Dispatch = ignore,
    watch: LinkWatch | None = None,
) -> AsyncIterator[Links]:
    """Links whose frames reach `dispatch` through a SocketServer on ADDR (reading with
    `receiver`'s limits), real sockets; frames for the sender go to `back`."""
    async with (
        serving(receiver or codec, dispatch),
        aiohttp.ClientSession() as http,
        asyncio.TaskGroup() as tg,
    ):
        links = Links(http, back, watch or Unwatched(), tg, codec, Refusals(), 5.0)
        yield links
        await links.close()


@asynccontextmanager
async def serving(
    codec: FrameCodec, dispatch: Dispatch
) -> AsyncIterator[tuple[SocketServer, web.AppRunner]]:
    """A SocketServer on ADDR reading with `codec`'s limits, its frames to `dispatch`, and
    the runner of its app."""
    server = SocketServer(codec, Refusals(), lambda: ADDR, dispatch, Unwatched())
    app = web.Application()
    app.add_routes([web.get("/chain/ws", server.handle_ws)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    try:
        yield server, runner
    finally:
        await server.close()
        await runner.cleanup()


async def test_a_closed_server_opens_no_new_socket_and_its_app_stops_at_once() -> None:
    """A leaving peer closes the sockets open to it, and a peer at their other end opens one
    back at once, to tell it of frames the closed one carried. Accepted, that socket stayed
    open until its heartbeat failed, and the leaving peer's exit waited about 16 s for it
    (every graceful stop of an origin in the suite). Refused, the sender hears so at once."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN)
    arrived: list[str] = []

    async def dispatch(frame: DataFrame) -> None:
        arrived.append(frame.session)

    async with (
        serving(codec, dispatch) as (server, runner),
        aiohttp.ClientSession() as http,
        asyncio.TaskGroup() as tg,
    ):
        links = Links(http, ignore, Unwatched(), tg, codec, Refusals(), 5.0)
        await links.send(ADDR, step("before", 1))
        while not arrived:
            await asyncio.sleep(0.01)
        await server.close()
        with pytest.raises(LinkError, match="cannot reach"):
            for _ in range(50):  # until the sender sees its socket closed and opens one
                await links.send(ADDR, step("after", 1))
                await asyncio.sleep(0.02)
        async with asyncio.timeout(3):
            await runner.cleanup()
        await links.close()
    assert arrived == ["before"]


async def test_frames_read_together_are_all_handled_before_what_they_set_off() -> None:
    """The last stage sends the first its steps for a wave of answers (and the tokens'
    copies) back to back. Had the reader let the loop run between them, the stage would start
    a pass with the first step alone, on the loop (short passes run there), and the others
    would wait for all of it: answers split into two waves (seen once, by hand)."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN)
    token = b"t" * 16
    sender = codec.channel(token, outbound=True)
    frames = [step("a", 1), TokenFrame(EPOCH, "a", 3, (7,)), step("b", 1)]
    records = [r for f in frames for r in sender.seal(f)]

    async def messages() -> AsyncIterator[SimpleNamespace]:  # all read already
        for record in records:
            yield SimpleNamespace(type=aiohttp.WSMsgType.BINARY, data=record)

    handled: list[str] = []

    async def dispatch(frame: DataFrame) -> None:
        handled.append(frame.session if isinstance(frame, StepFrame) else "copy")
        if isinstance(frame, StepFrame):  # as a stage's queue wakes its worker
            asyncio.get_running_loop().call_soon(handled.append, "pass")

    receiver = codec.channel(token, outbound=False)
    await read_frames(messages(), receiver, Refusals(), "x", dispatch)
    await asyncio.sleep(0)
    assert handled == ["a", "copy", "b", "pass", "pass"]


def test_a_step_past_the_frame_limit_goes_as_steps_of_its_rows_that_fit() -> None:
    """A long prompt's activations (a large model's, or under a low --max-frame) past the
    link's frame limit: steps of consecutive rows, each within it, which the next stage
    joins; only the last samples and carries the draft (the rows it samples, together).
    Before, the frame was refused whole and the answer broke on every replay."""
    frame = replace(step("long", 1000, draft=(4, 5, 6)), start=40)
    most = 10_000  # about 300 rows of 8 float32s: the step holds 1,003
    pieces = fitted(frame, most)
    assert len(pieces) > 2 and all(len(encode_frame(p)) <= most for p in pieces)
    assert all(isinstance(p, StepFrame) for p in pieces)
    steps = [p for p in pieces if isinstance(p, StepFrame)]
    assert [p.start for p in steps] == list(
        itertools.accumulate((p.tensor.shape[0] for p in steps[:-1]), initial=40)
    )
    assert b"".join(p.tensor.data for p in steps) == frame.tensor.data
    assert [(p.sample, p.draft) for p in steps[:-1]] == [(False, ())] * (len(steps) - 1)
    assert steps[-1] == replace(frame, start=steps[-1].start, tensor=steps[-1].tensor)
    assert steps[-1].tensor.shape[0] >= len(frame.draft) + 1
    small = step("short", 10)
    assert fitted(small, most) == [small]  # within the limit: itself
    drop = DropFrame(EPOCH, "s")
    assert fitted(drop, 10) == [drop]  # only steps are cut
    # Nothing of the steps lane is (a raw link's send_now writes its frames whole unasked).
    for lone in (step("s", 1), step("s", 1, draft=(4, 5, 6)), TokenFrame(EPOCH, "s", 3, (9,))):
        assert lane(lone) == STEPS and fitted(lone, 10) == [lone]


def test_prompts_are_paced_below_a_links_measured_rate_and_never_on_loopback() -> None:
    assert pace_rate("10.0.0.2:7000", 20) == 20e6 / 8 * PACE_SHARE
    assert pace_rate("peer.lan:7000", 100) == 100e6 / 8 * PACE_SHARE  # a name: elsewhere
    assert pace_rate("10.0.0.2:7000", 0) == 0  # not measured yet
    assert 0 < pace_rate("10.0.0.2:7000", 21_000) <= MAX_PACE  # 16.8 Gbit/s paced
    assert pace_rate("10.0.0.2:7000", 30_000) == 0  # past what the option takes: a veth pair
    for here in ("127.0.0.1:7000", "127.3.0.9:7000", "[::1]:7000", "localhost:7000"):
        assert pace_rate(here, 20) == 0, here


async def paced_lanes(*rates: float) -> dict[str, int]:
    """The kernel's pacing rate of each lane's socket once a prompt's rows have gone over a
    link measured at each of `rates` in turn, and a decode step after them."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"), hidden_size=HIDDEN)
    arrived: list[DataFrame] = []

    async def dispatch(frame: DataFrame) -> None:
        arrived.append(frame)

    watch = Unwatched()
    async with linked(codec, dispatch, watch=watch) as links:
        for watch.mbps in rates:
            await links.send(ADDR, step("s", 64))  # a prompt's rows: the bulk socket
        await links.send(ADDR, step("s", 1))  # a decode step: the steps socket
        while len(arrived) < len(rates) + 1:
            await asyncio.sleep(0.01)
        return {
            key[1]: ws.get_extra_info("socket").getsockopt(SOL_SOCKET, SO_MAX_PACING_RATE)
            & 0xFFFFFFFF  # unpaced reads as the kernel's ~0 (unsigned)
            for key, (ws, _) in links._sockets.items()
        }


@pytest.mark.skipif(not SO_MAX_PACING_RATE, reason="no kernel pacing on this platform")
async def test_a_prompts_activations_leave_paced_by_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a slow link, a prompt's activations sent as fast as TCP goes queue ahead of the
    decode steps on the other socket; the kernel paces the bulk socket instead. The test's
    peer listens on loopback, which is never paced: here it stands for one elsewhere."""
    unpaced = 0xFFFFFFFF
    assert await paced_lanes(20) == {BULK: unpaced, STEPS: unpaced}
    monkeypatch.setattr(links_module, "pace_rate", lambda _, mbps: pace_rate("10.0.0.2:1", mbps))
    assert await paced_lanes(20) == {BULK: 20e6 / 8 * PACE_SHARE, STEPS: unpaced}
    fastest = pace_rate("10.0.0.2:1", 21_000)  # the option's range, end to end
    assert await paced_lanes(21_000) == {BULK: fastest, STEPS: unpaced}
    assert await paced_lanes(20, 30_000) == {BULK: unpaced, STEPS: unpaced}  # measured fast
