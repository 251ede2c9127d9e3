"""Bytes on the wire: CBOR maps decoded into typed messages at the edge, or refused.

Control-plane messages (gossip) live here; every decoder validates types, ranges and sizes
and raises WireError with a one-line reason. Nothing from the network is unpickled.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import cbor2

from meshshard.types import (
    Epoch,
    LinkStat,
    Member,
    NodeId,
    PlanRecord,
    PlanStage,
    Profile,
    State,
)

PROTOCOL = 2
MAX_CONTROL_BYTES = 1 << 20  # a control message larger than this is refused unread
MAX_ITEMS = 4096  # members, profiles, stages, units or links in one message
# Every number has a range, far inside what the codec carries (2**63), so a peer that takes
# the largest value it accepts can still count past it: a forged incarnation or term at the
# edge of the range cannot lock a member out or freeze planning.
MAX_INCARNATION = 2**53  # milliseconds since 1970 at a member's start, plus its refutations
MAX_TERM = 2**40  # seconds since 2025, plus replans
MAX_VERSION = 2**53  # profile versions
MAX_COUNT = 2**31  # steps, positions, tokens, attempts, layers, units
MAX_MEMORY = 1e15  # bytes
MAX_MS = 1e7  # any time in milliseconds
MIN_MBPS, MAX_MBPS = 1e-3, 1e6  # a link's rate (a smaller one turns hop times infinite)
MAX_LOAD = 1e6  # sessions


class WireError(ValueError):
    """A message that does not decode into a valid typed message."""


@dataclass(frozen=True)
class Ping:
    sender: Member
    updates: tuple[Member, ...]
    plan: PlanRecord | None


@dataclass(frozen=True)
class Ack:
    sender: Member
    updates: tuple[Member, ...]
    plan: PlanRecord | None


@dataclass(frozen=True)
class PingReq:
    sender: Member
    target: NodeId
    target_addr: str
    updates: tuple[Member, ...]


@dataclass(frozen=True)
class Nack:
    sender: Member
    target: NodeId


@dataclass(frozen=True)
class Sync:
    sender: Member
    members: tuple[Member, ...]
    profiles: tuple[Profile, ...]
    plan: PlanRecord | None


ControlMessage = Ping | Ack | PingReq | Nack | Sync


def encode(msg: ControlMessage) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL, "sender": _member_out(msg.sender)}
    match msg:
        case Ping(updates=updates, plan=plan):
            body |= {
                "k": "ping",
                "updates": [_member_out(m) for m in updates],
                "plan": _plan_out(plan),
            }
        case Ack(updates=updates, plan=plan):
            body |= {
                "k": "ack",
                "updates": [_member_out(m) for m in updates],
                "plan": _plan_out(plan),
            }
        case PingReq(target=target, target_addr=addr, updates=updates):
            body |= {
                "k": "ping-req",
                "target": target,
                "addr": addr,
                "updates": [_member_out(m) for m in updates],
            }
        case Nack(target=target):
            body |= {"k": "nack", "target": target}
        case Sync(members=members, profiles=profiles, plan=plan):
            body |= {
                "k": "sync",
                "members": [_member_out(m) for m in members],
                "profiles": [_profile_out(p) for p in profiles],
                "plan": _plan_out(plan),
            }
    return bytes(cbor2.dumps(body))


def decode(data: bytes) -> ControlMessage:
    m = _load(data, MAX_CONTROL_BYTES, "message")
    sender = _member_in(m.get("sender"), "sender")
    kind = m.get("k")
    match kind:
        case "ping":
            return Ping(sender, _members(m.get("updates"), "updates"), _plan_in(m.get("plan")))
        case "ack":
            return Ack(sender, _members(m.get("updates"), "updates"), _plan_in(m.get("plan")))
        case "ping-req":
            return PingReq(
                sender,
                NodeId(_str(m.get("target"), "target")),
                _addr(m.get("addr"), "addr"),
                _members(m.get("updates"), "updates"),
            )
        case "nack":
            return Nack(sender, NodeId(_str(m.get("target"), "target")))
        case "sync":
            profiles = tuple(
                _profile_in(p, f"profiles[{i}]")
                for i, p in enumerate(_list(m.get("profiles"), "profiles"))
            )
            return Sync(
                sender, _members(m.get("members"), "members"), profiles, _plan_in(m.get("plan"))
            )
    raise WireError(f"unknown message kind {kind!r}")


def _member_out(m: Member) -> dict[str, Any]:
    return {
        "id": m.id,
        "addr": m.addr,
        "inc": m.incarnation,
        "state": m.state.value,
        "prio": m.priority,
        "pv": m.profile_version,
        "ready": [m.ready.term, m.ready.coordinator],
        "drain": m.draining,
    }


def _member_in(raw: object, what: str) -> Member:
    m = _map(raw, what)
    state = _str(m.get("state"), f"{what}.state")
    try:
        parsed = State(state)
    except ValueError:
        raise WireError(f"{what}.state: unknown state {state!r}") from None
    return Member(
        id=NodeId(_str(m.get("id"), f"{what}.id")),
        addr=_addr(m.get("addr"), f"{what}.addr"),
        incarnation=_int(m.get("inc"), f"{what}.inc", high=MAX_INCARNATION),
        state=parsed,
        priority=_int(m.get("prio"), f"{what}.prio", low=-(2**31), high=2**31),
        profile_version=_int(m.get("pv"), f"{what}.pv", high=MAX_VERSION),
        ready=_epoch(m.get("ready")),
        draining=_bool(m.get("drain"), f"{what}.drain"),
    )


def _members(raw: object, what: str) -> tuple[Member, ...]:
    return tuple(_member_in(x, f"{what}[{i}]") for i, x in enumerate(_list(raw, what)))


def _profile_out(p: Profile) -> dict[str, Any]:
    return {
        "id": p.id,
        "ver": p.version,
        "model": p.model,
        "mem": p.mem,
        "ms": list(p.unit_ms),
        "bms": [list(units) for units in p.batch_ms],
        "measured": p.measured,
        "links": {k: [s.mbps, s.rtt_ms] for k, s in p.links.items()},
        "load": p.load,
        "step": p.step_ms,
        "used": p.used,
        "ovh": p.overhead_ms,
    }


def _profile_in(raw: object, what: str) -> Profile:
    m = _map(raw, what)
    links = {}
    for peer, stat in _map(m.get("links"), f"{what}.links").items():
        pair = _list(stat, f"{what}.links")
        if len(pair) != 2:
            raise WireError(f"{what}.links[{peer!r}] must be [mbps, rtt_ms]")
        links[NodeId(_str(peer, f"{what}.links key"))] = LinkStat(
            _float(pair[0], f"{what}.links.mbps", MAX_MBPS, low=MIN_MBPS),
            _float(pair[1], f"{what}.links.rtt", MAX_MS),
        )
    measured = m.get("measured")
    if not isinstance(measured, bool):
        raise WireError(f"{what}.measured must be a boolean")
    return Profile(
        id=NodeId(_str(m.get("id"), f"{what}.id")),
        version=_int(m.get("ver"), f"{what}.ver", high=MAX_VERSION),
        model=_str(m.get("model"), f"{what}.model"),
        mem=_float(m.get("mem"), f"{what}.mem", MAX_MEMORY),
        unit_ms=tuple(_float(x, f"{what}.ms", MAX_MS) for x in _list(m.get("ms"), f"{what}.ms")),
        measured=measured,
        batch_ms=tuple(
            tuple(_float(x, f"{what}.bms", MAX_MS) for x in _list(units, f"{what}.bms"))
            for units in _list(m.get("bms", []), f"{what}.bms")
        ),
        links=links,
        load=_float(m.get("load"), f"{what}.load", MAX_LOAD),
        step_ms=_float(m.get("step", 0.0), f"{what}.step", MAX_MS),
        used=_float(m.get("used", 0.0), f"{what}.used", MAX_MEMORY),
        overhead_ms=_float(m.get("ovh", 0.0), f"{what}.ovh", MAX_MS),
    )


def _plan_out(p: PlanRecord | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "epoch": [p.epoch.term, p.epoch.coordinator],
        "model": p.model,
        "objective": p.objective,
        "stages": [[s.device, s.start, s.end] for s in p.stages],
        "latency_ms": p.latency_ms,
        "bottleneck_ms": p.bottleneck_ms,
        "reason": p.reason,
        "left_out": [[node, why] for node, why in p.left_out],
    }


def _plan_in(raw: object) -> PlanRecord | None:
    if raw is None:
        return None
    m = _map(raw, "plan")
    stages = []
    end = 0
    for i, s in enumerate(_list(m.get("stages"), "plan.stages")):
        triple = _list(s, f"plan.stages[{i}]")
        if len(triple) != 3:
            raise WireError(f"plan.stages[{i}] must be [device, start, end]")
        stage = PlanStage(
            NodeId(_str(triple[0], "plan.stages.device")),
            _int(triple[1], "plan.stages.start", high=MAX_COUNT),
            _int(triple[2], "plan.stages.end", high=MAX_COUNT),
        )
        if stage.start != end or stage.end <= stage.start:
            raise WireError(f"plan.stages[{i}] does not continue the chain")
        end = stage.end
        stages.append(stage)
    if not stages:
        raise WireError("plan has no stages")
    return PlanRecord(
        epoch=_epoch(m.get("epoch")),
        model=_str(m.get("model"), "plan.model"),
        objective=_str(m.get("objective"), "plan.objective"),
        stages=tuple(stages),
        latency_ms=_float(m.get("latency_ms"), "plan.latency_ms", MAX_MS),
        bottleneck_ms=_float(m.get("bottleneck_ms"), "plan.bottleneck_ms", MAX_MS),
        reason=_str(m.get("reason"), "plan.reason", empty=True),
        left_out=tuple(
            _left_out(x, i) for i, x in enumerate(_list(m.get("left_out", []), "plan.left_out"))
        ),
    )


def _left_out(raw: object, i: int) -> tuple[NodeId, str]:
    pair = _list(raw, f"plan.left_out[{i}]")
    if len(pair) != 2:
        raise WireError(f"plan.left_out[{i}] must be [node, reason]")
    return NodeId(_str(pair[0], "plan.left_out.node")), _str(pair[1], "plan.left_out.reason")


def _epoch(raw: object) -> Epoch:
    pair = _list(raw, "epoch")
    if len(pair) != 2:
        raise WireError("epoch must be [term, coordinator]")
    term = _int(pair[0], "epoch.term", high=MAX_TERM)
    return Epoch(term, _str(pair[1], "epoch.coordinator", empty=True))


def _load(data: bytes, limit: int, what: str) -> dict[Any, Any]:
    """A CBOR map of our protocol version, within `limit` bytes, or WireError."""
    if len(data) > limit:
        raise WireError(f"{what} of {len(data)} bytes exceeds {limit}")
    try:
        raw = cbor2.loads(data)
    except Exception as e:  # cbor2 raises several types for garbage
        raise WireError(f"not CBOR: {e}") from None
    m = _map(raw, what)
    version = _int(m.get("v"), "v")
    if version != PROTOCOL:
        raise WireError(f"protocol version {version}, expected {PROTOCOL}")
    return m


def _map(raw: object, what: str) -> dict[Any, Any]:
    if not isinstance(raw, dict):
        raise WireError(f"{what} must be a map")
    if len(raw) > MAX_ITEMS:
        raise WireError(f"{what} has {len(raw)} entries, more than {MAX_ITEMS}")
    return raw


def _list(raw: object, what: str) -> list[Any]:
    if not isinstance(raw, list):
        raise WireError(f"{what} must be a list")
    if len(raw) > MAX_ITEMS:
        raise WireError(f"{what} has {len(raw)} items, more than {MAX_ITEMS}")
    return raw


def _str(raw: object, what: str, empty: bool = False) -> str:
    if not isinstance(raw, str) or (not raw and not empty) or len(raw) > 256:
        raise WireError(f"{what} must be a non-empty string of at most 256 characters")
    return raw


def _int(raw: object, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer in [low, high)."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw < high:
        raise WireError(f"{what} must be an integer in [{low}, {high})")
    return raw


def _float(raw: object, what: str, high: float, low: float = 0.0, positive: bool = False) -> float:
    """A number in [low, high], or (0, high] when `positive`."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise WireError(f"{what} must be a number")
    value = float(raw)
    if not math.isfinite(value) or not low <= value <= high or (positive and value == 0):
        bounds = f"(0, {high:g}]" if positive else f"[{low:g}, {high:g}]"
        raise WireError(f"{what} must be a finite number in {bounds}")
    return value


def _addr(raw: object, what: str) -> str:
    addr = _str(raw, what)
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WireError(f"{what} must be host:port, got {addr!r}")
    return addr


# -- data plane ------------------------------------------------------------------------------

MAX_FRAME_BYTES = 64 * 1024 * 1024  # one activation frame; checked before it is read
MAX_TOKENS_PER_FRAME = 8192
TENSOR_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


class ErrorCode(enum.StrEnum):
    """Why a stage refused a frame; the origin's recovery (chain/recovery.py) acts on it."""

    BUSY = "busy"  # a new session the stage's memory cannot hold now: retry later
    STALE_EPOCH = "stale-epoch"  # the frame's epoch is older than the plan this peer follows
    NOT_READY = "not-ready"  # ... newer than the stage it serves: it is still loading
    UNKNOWN_SESSION = "unknown-session"
    CACHE_MISS = "cache-miss"  # a stage holds fewer positions than the frame continues from
    NO_HANDOFF = "no-handoff"  # a KV handoff could not be made; the origin replays instead
    BAD_FRAME = "bad-frame"
    INTERNAL = "internal"


MAX_KV_DIM = 4096  # heads or head size in a handed-off KV cache
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63


@dataclass(frozen=True)
class TensorData:
    """A tensor as raw little-endian bytes, its dtype and shape (never pickled)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


@dataclass(frozen=True)
class StepFrame:
    """Tokens (ids, or the previous stage's hidden states) at positions start.. of a session."""

    epoch: Epoch
    session: str
    step: int  # which generated token this computes
    start: int  # position of the first token in the frame
    tensor: TensorData
    origin: str  # host:port that receives the sampled token
    sample: bool  # False for all but the last chunk of a chunked prefill
    sampling: Sampling
    attempt: int = 0  # the origin's try for this session; answers to older tries are ignored
    reserve: int = 0  # positions the session may reach (prompt and most tokens): admission


@dataclass(frozen=True)
class TokenFrame:
    epoch: Epoch
    session: str
    step: int
    token: int
    attempt: int = 0


@dataclass(frozen=True)
class ErrorFrame:
    epoch: Epoch
    session: str
    step: int
    code: ErrorCode
    message: str
    attempt: int = 0
    have: int = 0  # for "cache-miss": the positions the refusing stage does hold


@dataclass(frozen=True)
class DropFrame:
    """The session is over: free its caches."""

    epoch: Epoch
    session: str


@dataclass(frozen=True)
class HandoffRequest:
    """From a session's origin to a peer that held units [start, end) of the session: send
    the first `length` positions of their KV cache to `to`, which serves them in `epoch`."""

    epoch: Epoch
    session: str
    attempt: int
    start: int
    end: int
    length: int
    to: str
    origin: str


@dataclass(frozen=True)
class KVFrame:
    """One layer's cached keys and values of a session, [1, kv_heads, length, head_dim] each.
    The receiver tells the origin once the `final` one is in place."""

    epoch: Epoch
    session: str
    attempt: int
    layer: int
    keys: TensorData
    values: TensorData
    origin: str
    final: bool


@dataclass(frozen=True)
class HandoffDone:
    """To the origin: the handed-off layers are in place on the new owner."""

    epoch: Epoch
    session: str
    attempt: int
    layers: int


DataFrame = StepFrame | TokenFrame | ErrorFrame | DropFrame | HandoffRequest | KVFrame | HandoffDone


def encode_frame(frame: DataFrame) -> bytes:
    body: dict[str, Any] = {
        "v": PROTOCOL,
        "epoch": [frame.epoch.term, frame.epoch.coordinator],
        "session": frame.session,
    }
    match frame:
        case StepFrame():
            body |= {
                "k": "step",
                "attempt": frame.attempt,
                "step": frame.step,
                "start": frame.start,
                "tensor": _tensor_out(frame.tensor),
                "origin": frame.origin,
                "sample": frame.sample,
                "sampling": [frame.sampling.temperature, frame.sampling.top_p, frame.sampling.seed],
                "reserve": frame.reserve,
            }
        case TokenFrame():
            body |= {
                "k": "token",
                "attempt": frame.attempt,
                "step": frame.step,
                "token": frame.token,
            }
        case ErrorFrame():
            body |= {
                "k": "error",
                "attempt": frame.attempt,
                "step": frame.step,
                "code": frame.code.value,
                "msg": frame.message,
                "have": frame.have,
            }
        case DropFrame():
            body |= {"k": "drop"}
        case HandoffRequest():
            body |= {
                "k": "handoff",
                "attempt": frame.attempt,
                "units": [frame.start, frame.end],
                "length": frame.length,
                "to": frame.to,
                "origin": frame.origin,
            }
        case KVFrame():
            body |= {
                "k": "kv",
                "attempt": frame.attempt,
                "layer": frame.layer,
                "keys": _tensor_out(frame.keys),
                "values": _tensor_out(frame.values),
                "origin": frame.origin,
                "final": frame.final,
            }
        case HandoffDone():
            body |= {"k": "handoff-done", "attempt": frame.attempt, "layers": frame.layers}
    return bytes(cbor2.dumps(body))


def decode_frame(
    data: bytes, hidden_size: int | None = None, limit: int = MAX_FRAME_BYTES
) -> DataFrame:
    """Decode and validate one data-plane frame; `hidden_size` pins activation shapes."""
    m = _load(data, limit, "frame")
    epoch = _epoch(m.get("epoch"))
    session = _str(m.get("session"), "session")
    kind = m.get("k")
    if kind == "drop":
        return DropFrame(epoch, session)
    attempt = _int(m.get("attempt"), "attempt")
    match kind:
        case "step":
            return StepFrame(
                epoch=epoch,
                session=session,
                step=_int(m.get("step"), "step"),
                start=_int(m.get("start"), "start"),
                tensor=_tensor(m.get("tensor"), hidden_size),
                origin=_addr(m.get("origin"), "origin"),
                sample=_bool(m.get("sample"), "sample"),
                sampling=_sampling(m.get("sampling")),
                attempt=attempt,
                reserve=_int(m.get("reserve", 0), "reserve"),
            )
        case "token":
            step, token = _int(m.get("step"), "step"), _int(m.get("token"), "token")
            return TokenFrame(epoch, session, step, token, attempt)
        case "error":
            try:
                code = ErrorCode(_str(m.get("code"), "code"))
            except ValueError:
                raise WireError(f"unknown error code {m.get('code')!r}") from None
            message = m.get("msg")
            if not isinstance(message, str) or len(message) > 4096:
                raise WireError("msg must be a string of at most 4096 characters")
            step, have = _int(m.get("step"), "step"), _int(m.get("have"), "have")
            return ErrorFrame(epoch, session, step, code, message, attempt, have)
        case "handoff":
            units = _list(m.get("units"), "units")
            if len(units) != 2:
                raise WireError("units must be [start, end]")
            start, end = _int(units[0], "units.start"), _int(units[1], "units.end")
            if start >= end:
                raise WireError(f"units [{start}, {end}) is empty")
            return HandoffRequest(
                epoch,
                session,
                attempt,
                start,
                end,
                _int(m.get("length"), "length"),
                _addr(m.get("to"), "to"),
                _addr(m.get("origin"), "origin"),
            )
        case "kv":
            keys, values = _kv(m.get("keys"), "keys"), _kv(m.get("values"), "values")
            if keys.shape != values.shape or keys.dtype != values.dtype:
                raise WireError("keys and values must have the same dtype and shape")
            return KVFrame(
                epoch,
                session,
                attempt,
                _int(m.get("layer"), "layer"),
                keys,
                values,
                _addr(m.get("origin"), "origin"),
                _bool(m.get("final"), "final"),
            )
        case "handoff-done":
            return HandoffDone(epoch, session, attempt, _int(m.get("layers"), "layers"))
    raise WireError(f"unknown frame kind {kind!r}")


def _tensor_out(t: TensorData) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": list(t.shape), "data": t.data}


def _tensor(raw: object, hidden_size: int | None) -> TensorData:
    t = _tensor_in(raw, "tensor")
    ids = t.dtype == "int64"
    if len(t.shape) != (1 if ids else 2) or not 0 < t.shape[0] <= MAX_TOKENS_PER_FRAME:
        raise WireError(f"tensor.shape {list(t.shape)} is not [tokens] ids or [tokens, hidden]")
    if not ids and hidden_size is not None and t.shape[1] != hidden_size:
        raise WireError(f"tensor.shape {list(t.shape)}: hidden size must be {hidden_size}")
    return t


def _kv(raw: object, what: str) -> TensorData:
    t = _tensor_in(raw, what)
    if t.dtype == "int64" or len(t.shape) != 4 or t.shape[0] != 1:
        raise WireError(f"{what} must be a float [1, heads, length, head_dim] tensor")
    if not 0 < t.shape[1] <= MAX_KV_DIM or not 0 < t.shape[3] <= MAX_KV_DIM:
        raise WireError(f"{what}.shape {list(t.shape)}: heads and head size exceed {MAX_KV_DIM}")
    return t


def _tensor_in(raw: object, what: str) -> TensorData:
    m = _map(raw, what)
    dtype = _str(m.get("dtype"), f"{what}.dtype")
    if dtype not in TENSOR_DTYPES:
        raise WireError(f"{what}.dtype {dtype!r} is not one of {', '.join(TENSOR_DTYPES)}")
    dims = _list(m.get("shape"), f"{what}.shape")
    if len(dims) > 4:
        raise WireError(f"{what}.shape has {len(dims)} dimensions, more than 4")
    shape = tuple(_int(d, f"{what}.shape") for d in dims)
    data = m.get("data")
    if not isinstance(data, bytes):
        raise WireError(f"{what}.data must be bytes")
    expected = TENSOR_DTYPES[dtype] * math.prod(shape)
    if len(data) != expected:
        raise WireError(f"{what}.data has {len(data)} bytes, dtype x shape needs {expected}")
    return TensorData(dtype, shape, data)


def _sampling(raw: object) -> Sampling:
    triple = _list(raw, "sampling")
    if len(triple) != 3:
        raise WireError("sampling must be [temperature, top_p, seed]")
    temperature = _float(triple[0], "temperature", MAX_TEMPERATURE)
    top_p = _float(triple[1], "top_p", 1.0, positive=True)
    return Sampling(temperature, top_p, _int(triple[2], "seed", high=MAX_SEED))


def _bool(raw: object, what: str) -> bool:
    if not isinstance(raw, bool):
        raise WireError(f"{what} must be a boolean")
    return raw
