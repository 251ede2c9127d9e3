"""Data-plane frames: round trips, and refusal of everything malformed (with fuzzing)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import cbor2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshard.api.stops import StopMatcher
from meshshard.chain.tensors import from_wire, ids_from_wire, ids_to_wire, to_wire
from meshshard.types import Epoch, Fallback, NodeId, PlanStage
from meshshard.wire import (
    MAX_FRAME_BYTES,
    PROTOCOL,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    PickFrame,
    Sampling,
    StepFrame,
    Sync,
    TensorData,
    TokenFrame,
    WireError,
    decode,
    decode_frame,
    encode,
    encode_frame,
)

E = Epoch(3, "peer-c")
S = Sampling(0.7, 0.9, 42)


def step(tensor: TensorData) -> StepFrame:
    return StepFrame(E, "s1", 2, 10, tensor, "127.0.0.1:7000", True, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_states_round_trip_bit_exact(dtype: torch.dtype) -> None:
    hidden = torch.randn(3, 16).to(dtype)
    frame = decode_frame(encode_frame(step(to_wire(hidden))), hidden_size=16)
    assert isinstance(frame, StepFrame)
    assert torch.equal(from_wire(frame.tensor), hidden)
    assert frame.sampling == S and frame.epoch == E


def test_other_frames_round_trip() -> None:
    kv = to_wire(torch.randn(1, 3, 7, 64))
    for frame in (
        TokenFrame(E, "s", 4, (49151,), attempt=2),
        TokenFrame(E, "s", 4, (7, 8, 9), attempt=2, drafted=4),
        ErrorFrame(E, "s", 4, ErrorCode.STALE_EPOCH, "old", attempt=1),
        ErrorFrame(E, "s", 4, ErrorCode.CACHE_MISS, "short", attempt=1, have=17),
        DropFrame(E, "s"),
        step(to_wire(torch.tensor([1, 2, 3]))),
        replace(step(to_wire(torch.tensor([1, 2, 3]))), draft=(2, 3)),
        replace(step(to_wire(torch.tensor([1, 2]))), loop="127.0.0.1:7002", until=63, stops=(2,)),
        replace(step(to_wire(torch.tensor([1, 2, 3]))), loop="127.0.0.1:7", draft=(3,), drafts=8),
        replace(step(to_wire(torch.randn(1, 16))), loop="127.0.0.1:7002", until=63, head=24576),
        replace(step(to_wire(torch.randn(3, 16))), loop="127.0.0.1:7", draft=(4, 5), head=128),
        replace(step(to_wire(torch.randn(1, 16))), loop="127.0.0.1:7", head=9, core=(2**60 - 1, 3)),
        replace(step(to_wire(torch.randn(1, 16))), loop="127.0.0.1:7", head=96, together=8),
        replace(step(to_wire(torch.tensor([1, 2, 3]))), sample=False, ends=2016),
        PickFrame(E, "s", 5, (49151,), (-3.25,), attempt=1),
        PickFrame(E, "s", 5, (0, 7, 9), (1e30, -1.0, 0.5)),
        HandoffRequest(E, "s", 3, 5, 12, 40, "127.0.0.1:7001", "127.0.0.1:7000"),
        KVFrame(E, "s", 3, 9, kv, kv, "127.0.0.1:7000", final=True),
        KVFrame(E, "s", 3, 9, kv, kv, "127.0.0.1:7000", final=False, start=40),  # a piece
        HandoffDone(E, "s", 3, 7),
    ):
        assert decode_frame(encode_frame(frame)) == frame


def raw_kv(**changes: object) -> bytes:
    kv = {"dtype": "float32", "shape": [1, 3, 2, 4], "data": bytes(96)}
    body = {
        "v": PROTOCOL,
        "k": "kv",
        "epoch": [3, "c"],
        "session": "s",
        "attempt": 0,
        "layer": 4,
        "keys": kv,
        "values": kv,
        "origin": "127.0.0.1:7000",
        "final": True,
    }
    body.update(changes)
    return cbor2.dumps(body)


@pytest.mark.parametrize(
    "data, message",
    [
        (raw_kv(keys={"dtype": "float32", "shape": [1, 3, 2], "data": bytes(24)}), "float \\["),
        (raw_kv(keys={"dtype": "int64", "shape": [1, 3, 2, 2], "data": bytes(96)}), "float"),
        (raw_kv(keys={"dtype": "float32", "shape": [1, 3, 4, 2], "data": bytes(96)}), "same"),
        (raw_kv(keys={"dtype": "float32", "shape": [1, 0, 2, 4], "data": b""}), "heads"),
        (raw_kv(keys={"dtype": "float32", "shape": [1] * 9, "data": bytes(4)}), "dimensions"),
        (raw_kv(values={"dtype": "float32", "shape": [1, 3, 2, 4], "data": bytes(95)}), "needs"),
        (raw_kv(final="yes"), "boolean"),
        (raw_kv(k="handoff", units=[4, 4], length=3, to="a:1"), "empty"),
        (raw_kv(k="handoff", units=[1, 4], length=3, to="nowhere"), "host:port"),
        (raw_kv(attempt=-1), "attempt"),
    ],
)
def test_malformed_handoff_frames_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_frame(data)


def ids(n: int) -> dict:
    return {"dtype": "int64", "shape": [n], "data": bytes(8 * n)}


def hidden(n: int) -> dict:
    return {"dtype": "float32", "shape": [n, 4], "data": bytes(16 * n)}


def raw_step(**changes: object) -> bytes:
    body = {
        "v": PROTOCOL,
        "k": "step",
        "epoch": [3, "c"],
        "session": "s",
        "attempt": 0,
        "step": 0,
        "start": 0,
        "tensor": {"dtype": "float32", "shape": [1, 4], "data": bytes(16)},
        "origin": "127.0.0.1:7000",
        "sample": True,
        "sampling": [0.0, 1.0, 1],
    }
    body.update(changes)
    return cbor2.dumps(body)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\x00garbage", "not CBOR"),
        (cbor2.dumps([1, 2]), "must be a map"),
        (raw_step(k="launch"), "unknown frame kind"),
        (raw_step(v=9), "protocol version"),
        (raw_step(epoch=[-1, "c"]), "epoch.term"),
        (raw_step(tensor={"dtype": "float64", "shape": [1, 4], "data": bytes(32)}), "dtype"),
        (raw_step(tensor={"dtype": "float32", "shape": [1, 4], "data": bytes(15)}), "needs 16"),
        (raw_step(tensor={"dtype": "float32", "shape": [10**9, 4], "data": b""}), "shape"),
        (raw_step(tensor={"dtype": "float32", "shape": [1, 5], "data": bytes(20)}), "hidden size"),
        (raw_step(origin="nowhere"), "host:port"),
        (raw_step(sampling=[0.0, 0.0, 1]), "top_p"),
        (raw_step(sampling=[float("nan"), 1.0, 1]), "finite"),
        (raw_step(step="two"), "integer"),
        (raw_step(sample=1), "boolean"),
        # A draft ends a sampled frame and leaves at least one fed token before it.
        (raw_step(draft=[5]), "a draft must end a sampled frame"),
        (raw_step(draft=[5], sample=False), "a draft must end a sampled frame"),
        (raw_step(draft=list(range(17))), "0 to 16 token ids"),
        (raw_step(draft=[-1]), "draft must be an integer"),
        # A step the chain feeds itself says where to; its first stage drafts at most 16.
        (raw_step(loop="nowhere"), "host:port"),
        (raw_step(loop="127.0.0.1:7002", until=-1), "until"),
        (raw_step(loop="127.0.0.1:7002", stops=list(range(17))), "0 to 16 token ids"),
        (raw_step(drafts=17), r"drafts must be an integer in \[0, 17\)"),
        (raw_step(drafts=True), "drafts must be an integer"),
        # A split head's step carries a hidden state for its token and each drafted one,
        # and feeds the chain; a pick, a token and a logit for each.
        (raw_step(head=48), "a hidden state for each row"),
        (raw_step(loop="127.0.0.1:7002", head=48, tensor=ids(1)), "a hidden state for each row"),
        (raw_step(loop="127.0.0.1:7002", head=48, draft=[5], tensor=hidden(3)), "for each row"),
        (raw_step(loop="127.0.0.1:7002", head=-1), "head must be an integer"),
        # ... and may name the core its sender scores its own share on, (host, core).
        (raw_step(core=[5, 1]), "only a split head's hidden states name"),
        (raw_step(loop="127.0.0.1:7002", head=48, core=[5]), r"core must be \[host, core\]"),
        (raw_step(loop="127.0.0.1:7002", head=48, core=[0, 1]), "core's host must be"),
        (raw_step(loop="127.0.0.1:7002", head=48, core=[2**60, 1]), "core's host must be"),
        (raw_step(loop="127.0.0.1:7002", head=48, core=[5, 2**16]), "core must be an integer"),
        (raw_step(loop="127.0.0.1:7002", head=48, core="5:1"), "core must be a list"),
        # A wave's row holds one hidden state whose whole head the first stage scores.
        (raw_step(loop="127.0.0.1:7002", together=8, tensor=hidden(1)), "a wave's head holds"),
        (
            raw_step(loop="127.0.0.1:7002", head=48, together=2, draft=[5], tensor=hidden(2)),
            "a wave's head holds",
        ),
        (raw_step(loop="127.0.0.1:7002", head=48, together=65), "together must be an integer"),
        (raw_step(loop="127.0.0.1:7002", head=48, together=-1), "together must be an integer"),
        (raw_step(ends=-1), "ends must be an integer"),
        (raw_step(ends="2016"), "ends must be an integer"),
        (raw_step(k="pick", tokens=[3], logits=[float("nan")]), "logit must be a finite"),
        (raw_step(k="pick", tokens=[3], logits=["high"]), "logit must be a number"),
        (raw_step(k="pick", tokens=[2**31], logits=[1.0]), "tokens must be an integer"),
        (raw_step(k="pick", tokens=[3, 4], logits=[1.0]), "1 logits for 2 picked tokens"),
        (raw_step(k="pick", tokens=[], logits=[]), "1 to 17 token ids"),
        (raw_step(k="pick", token=3, logit=1.0), "tokens must be a list"),  # protocol 2's
        (raw_step(k="token", tokens=[]), "1 to 17 token ids"),
        (raw_step(k="token", tokens=[2**31]), "tokens must be an integer"),
        # A pass confirms at most what it verified, and one token of its own.
        (raw_step(k="token", tokens=[1, 2]), "2 tokens from a pass that verified 0"),
        (raw_step(k="token", tokens=[1, 2, 3], drafted=1), "3 tokens from a pass that verified 1"),
        (raw_step(k="token", tokens=[1], drafted=17), "drafted must be an integer"),
        (b"\x00" * (MAX_FRAME_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_frame(data, hidden_size=4)


def raw_sync(member: dict | None = None, profile: dict | None = None, plan: object = None) -> bytes:
    """A well-formed gossip sync with some fields changed, as a key holder could send."""
    me = {"id": "x", "addr": "127.0.0.1:7000", "inc": 1, "state": "alive", "prio": 0, "pv": 1}
    me |= {"ready": [0, ""], "drain": False} | (member or {})
    prof = {"id": "x", "ver": 1, "model": "m", "mem": 1e9, "ms": [1.0], "measured": True}
    prof |= {"links": {}, "load": 0.0} | (profile or {})
    body = {"v": PROTOCOL, "k": "sync", "sender": me, "members": [me], "profiles": [prof]}
    return cbor2.dumps(body | {"plan": plan})


PLAN = {"epoch": [3, "x"], "model": "m", "objective": "latency", "stages": [["x", 0, 1]]}
PLAN |= {"latency_ms": 1.0, "bottleneck_ms": 1.0, "reason": ""}
FALLBACK = [["y", 0, 1]]


def test_a_plan_travels_with_its_fallbacks_waves_and_head_share() -> None:
    assert decode(raw_sync(plan=PLAN)).plan.waves == 1  # type: ignore[union-attr]
    assert decode(raw_sync(plan=PLAN)).plan.head_share == 0  # type: ignore[union-attr]
    assert decode(raw_sync(plan=PLAN)).plan.wave_head is False  # type: ignore[union-attr]
    split = decode(raw_sync(plan=PLAN | {"head": 0.45, "wave_head": True}))
    assert isinstance(split, Sync) and split.plan is not None and split.plan.head_share == 0.45
    assert split.plan.wave_head
    assert decode(encode(split)) == split
    with pytest.raises(WireError, match=r"plan\.wave_head"):
        decode(raw_sync(plan=PLAN | {"wave_head": 1}))
    assert decode(raw_sync(plan=PLAN)).plan.wave_counts == (1,)  # type: ignore[union-attr]
    by = decode(raw_sync(plan=PLAN | {"waves_by": [1, 1]}))
    assert isinstance(by, Sync) and by.plan is not None and by.plan.wave_counts == (1, 1)
    assert decode(encode(by)) == by
    sync = decode(raw_sync(plan=PLAN | {"fallbacks": [["x", FALLBACK]], "waves": 1}))
    assert isinstance(sync, Sync) and sync.plan is not None
    assert sync.plan.fallbacks == (Fallback(NodeId("x"), (PlanStage(NodeId("y"), 0, 1),)),)
    assert sync.plan.fallback(NodeId("x")) == sync.plan.fallbacks[0]
    assert sync.plan.fallback(NodeId("y")) is None
    assert decode(encode(sync)) == sync


def test_a_profile_travels_with_its_paces() -> None:
    sync = decode(raw_sync())
    assert isinstance(sync, Sync)  # older peers send none
    assert sync.profiles[0].pace == sync.profiles[0].batch_pace == 1.0
    sync = decode(raw_sync(profile={"pace": 1.25, "bpace": 0.9}))
    assert isinstance(sync, Sync)
    assert (sync.profiles[0].pace, sync.profiles[0].batch_pace) == (1.25, 0.9)
    assert decode(encode(sync)) == sync


@pytest.mark.parametrize(
    "data, message",
    [
        # A rate of 0 would divide by zero in the coordinator; ranges stop every such value.
        (
            raw_sync(profile={"links": {"y": [0.0, 1.0]}}),
            r"mbps must be a finite number in \[0.001",
        ),
        (raw_sync(profile={"links": {"y": [1e-300, 1.0]}}), "mbps"),  # hop times of infinity
        (raw_sync(profile={"links": {"y": [1e9, 1.0]}}), "mbps"),
        (raw_sync(profile={"mem": 1e300}), "mem"),
        (raw_sync(profile={"ms": [1e12]}), "ms"),
        (raw_sync(profile={"ver": 2**63 - 1}), "ver"),
        (raw_sync(profile={"pace": 0.0}), "pace"),  # it scales every pass the model plays
        (raw_sync(profile={"pace": 1e3}), "pace"),
        # Incarnations and terms stay far from the codec's limit, so one more always fits.
        (raw_sync(member={"inc": 2**63 - 1}), "inc"),
        (raw_sync(member={"prio": 2**40}), "prio"),
        (raw_sync(member={"ready": [2**63 - 1, "x"]}), "epoch.term"),
        (raw_sync(member={"by": "y"}), "only a suspect has an accuser"),  # an alive record
        (raw_sync(member={"state": "suspect", "by": 7}), "by"),
        (raw_sync(plan=PLAN | {"epoch": [2**63 - 1, "x"]}), "epoch.term"),
        (raw_sync(plan=PLAN | {"stages": [["x", 0, 2**40]]}), "plan.stages.end"),
        (raw_sync(plan=PLAN | {"latency_ms": float("inf")}), "latency_ms"),
        (raw_sync(plan=PLAN | {"fallbacks": [["x"]]}), r"must be \[lost member, stages\]"),
        (raw_sync(plan=PLAN | {"fallbacks": [["x", []]]}), r"fallbacks\[0\].stages: no stages"),
        (raw_sync(plan=PLAN | {"fallbacks": [["x", [["y", 1, 2]]]]}), "does not continue"),
        (raw_sync(plan=PLAN | {"fallbacks": [["x", FALLBACK], ["y", FALLBACK]]}), "one per stage"),
        (raw_sync(plan=PLAN | {"waves": 2}), "plan.waves"),  # more waves than stages
        (raw_sync(plan=PLAN | {"waves": 0}), "plan.waves"),
        (raw_sync(plan=PLAN | {"waves_by": [1, 2]}), "plan.waves_by"),
        (raw_sync(plan=PLAN | {"waves_by": 1}), "plan.waves_by"),
        (raw_sync(plan=PLAN | {"head": 1.5}), "plan.head"),  # a share of the vocabulary
        (raw_sync(plan=PLAN | {"head": -0.1}), "plan.head"),
    ],
)
def test_gossip_fields_out_of_range_are_refused(data: bytes, message: str) -> None:
    decode(raw_sync())  # the unchanged message is fine
    with pytest.raises(WireError, match=message):
        decode(data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_are_refused(dtype: torch.dtype, bad: float) -> None:
    activations = torch.randn(3, 8).to(dtype)
    activations[1, 5] = bad
    with pytest.raises(WireError, match="NaN"):
        from_wire(to_wire(activations))


def test_token_ids_go_as_torch_would_send_them() -> None:
    for ids in ([7], [0, 49151, 2**40, 3]):
        wire = ids_to_wire(ids)
        assert wire == to_wire(torch.tensor(ids, dtype=torch.int64))
        assert ids_from_wire(wire) == ids == from_wire(wire).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_activations_pass_whatever_their_size(dtype: torch.dtype) -> None:
    # The largest finite values share their top byte with NaN and infinity (tensors.py's
    # screen), the smallest are subnormal: each must arrive as it went.
    info = torch.finfo(dtype)
    values = torch.tensor([[info.max, -info.max, info.tiny, -info.tiny, 0.0, -0.0, 1.0, 2.0**-149]])
    activations = values.to(dtype)
    assert torch.equal(from_wire(to_wire(activations)), activations)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoders(data: bytes) -> None:
    for decoder in (decode_frame, decode):
        with contextlib.suppress(WireError):
            decoder(data)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)  # tools/fuzz_wire.py goes deeper
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "k",
                "epoch",
                "session",
                "step",
                "start",
                "tensor",
                "origin",
                "sample",
                "sampling",
                "token",
                "code",
                "msg",
                "attempt",
                "have",
                "units",
                "length",
                "to",
                "layer",
                "keys",
                "values",
                "final",
                "layers",
            ]
        ),
        json_like,
    )
)
def test_random_structures_never_crash_the_frame_decoder(body: dict) -> None:
    with contextlib.suppress(WireError):
        decode_frame(cbor2.dumps(body))


@pytest.mark.parametrize(
    "pieces, stops, want, stopped",
    [
        (["Hello", " wor", "ld"], ["STOP"], "Hello world", False),
        (["Hello ST", "OP more"], ["STOP"], "Hello ", True),
        (["ab", "c"], ["bcd"], "abc", False),
        (["x\n\n", "y"], ["\n\n"], "x", True),
    ],
)
def test_stop_strings_hold_back_only_what_could_match(
    pieces: list[str], stops: list[str], want: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    assert (out, matcher.stopped) == (want, stopped)


def test_the_fuzzers_seeds_are_messages_the_wire_takes() -> None:
    """tools/fuzz_wire.py mutates these; one the wire refused would leave its fields unfuzzed
    (its Sync seed did, from when profiles grew batch timings until the thirty-third session)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import fuzz_wire

    frames, control = fuzz_wire.seeds()
    fuzz_wire.check_seeds(frames, control)
    kinds = {type(decode_frame(f, fuzz_wire.HIDDEN)).__name__ for f in frames}
    assert kinds >= {"StepFrame", "TokenFrame", "PickFrame", "ErrorFrame", "KVFrame"}
