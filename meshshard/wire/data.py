"""Data-plane frames: typed, frozen, and their CBOR form (tensors as raw bytes + dtype +
shape, never pickled)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import cbor2

from meshshard.types import Epoch
from meshshard.wire import checks
from meshshard.wire.checks import PROTOCOL, WireError

MAX_FRAME_BYTES = 64 * 1024 * 1024  # one activation frame; checked before it is read
MAX_TOKENS_PER_FRAME = 8192
MAX_DRAFT = 16  # drafted tokens one step may ask the chain to verify
MAX_STOPS = 16  # token ids that end an answer, as a self-feeding step carries them
MAX_TOGETHER = 64  # rows of one pass a first stage scores together (a wave's head)
MAX_TOKEN_ID = 2**31
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
MAX_LOGIT = 3.4e38  # float32's range
MAX_HOST = 2**60  # a host's tag, from its boot id (chain/cores.py)
MAX_CORE = 2**16


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
    # Speculation: the frame's last len(draft) tokens are these guesses of the next ones; the
    # last stage samples every position and keeps the guesses that its samples confirm.
    draft: tuple[int, ...] = ()
    # The chain feeds itself: the last stage sends the next step to `loop` (the first stage)
    # as well as the token to the origin, up to step `until`, unless a token is in `stops`.
    loop: str = ""  # "": the origin sends each step
    until: int = 0
    stops: tuple[int, ...] = ()
    # The answer speculates: the first stage keeps its ids, and drafts up to this many tokens
    # onto each decode step the chain feeds itself (chain/drafts.py). 0: it does not.
    drafts: int = 0
    # A split head (chain/picks.py): the tensor is the last stage's normed hidden states of
    # this step's pass, a row for its token and one for each drafted token; this first
    # stage scores vocabulary rows [0, head) of its tied embedding for each, and the better
    # of those and the last stage's PickFrame, row by row, are the pass's picks. 0: the
    # tensor holds the step's input.
    head: int = 0
    # Where the sender of a split head's hidden states scores its own share, (host, core):
    # a first stage woken on that core of that host moves off it for its pick (chain/cores.py).
    core: tuple[int, int] | None = None
    # A wave's head (chain/picks.py WaveRows): this step's normed hidden state is one of the
    # `together` rows of the last stage's pass, whose whole head (`head` the vocabulary) the
    # first stage scores in one product once all have come; no PickFrame follows. 0: not.
    together: int = 0
    # Where the prompt (or the feed after a replay) these rows belong to ends: a stage that
    # has only its first chunks still knows how deep its slices are (chain/schedule.py). 0:
    # not said (a decode step).
    ends: int = 0


@dataclass(frozen=True)
class TokenFrame:
    """The tokens of steps step, step+1, ...: one, or more when a draft was confirmed."""

    epoch: Epoch
    session: str
    step: int
    tokens: tuple[int, ...]
    attempt: int = 0
    drafted: int = 0  # tokens the pass verified: all but one of the tokens may be confirmed ones


@dataclass(frozen=True)
class PickFrame:
    """The last stage's best tokens over its share of a split head, and their logits: one
    for each row of the step's pass."""

    epoch: Epoch
    session: str
    step: int
    tokens: tuple[int, ...]
    logits: tuple[float, ...]
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
    # Where these positions start in the layer's cache: a layer past the frame limit goes in
    # pieces of consecutive positions (chain/lanes.py, fitted), each appended to the last.
    start: int = 0


@dataclass(frozen=True)
class HandoffDone:
    """To the origin: the handed-off layers are in place on the new owner."""

    epoch: Epoch
    session: str
    attempt: int
    layers: int


DataFrame = (
    StepFrame
    | TokenFrame
    | PickFrame
    | ErrorFrame
    | DropFrame
    | HandoffRequest
    | KVFrame
    | HandoffDone
)


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
                "draft": list(frame.draft),
            }
            if frame.loop:
                body |= {"loop": frame.loop, "until": frame.until, "stops": list(frame.stops)}
            if frame.drafts:
                body |= {"drafts": frame.drafts}
            if frame.head:
                body |= {"head": frame.head}
            if frame.core is not None:
                body |= {"core": list(frame.core)}
            if frame.together:
                body |= {"together": frame.together}
            if frame.ends:
                body |= {"ends": frame.ends}
        case TokenFrame():
            body |= {
                "k": "token",
                "attempt": frame.attempt,
                "step": frame.step,
                "tokens": list(frame.tokens),
            }
            if frame.drafted:
                body |= {"drafted": frame.drafted}
        case PickFrame():
            body |= {
                "k": "pick",
                "attempt": frame.attempt,
                "step": frame.step,
                "tokens": list(frame.tokens),
                "logits": list(frame.logits),
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
            if frame.start:
                body |= {"start": frame.start}
        case HandoffDone():
            body |= {"k": "handoff-done", "attempt": frame.attempt, "layers": frame.layers}
    return bytes(cbor2.dumps(body))


def decode_frame(
    data: bytes, hidden_size: int | None = None, limit: int = MAX_FRAME_BYTES
) -> DataFrame:
    """Decode and validate one data-plane frame; `hidden_size` pins activation shapes."""
    m = checks.load(data, limit, "frame")
    epoch = checks.epoch(m.get("epoch"))
    session = checks.text(m.get("session"), "session")
    kind = m.get("k")
    if kind == "drop":
        return DropFrame(epoch, session)
    attempt = checks.integer(m.get("attempt"), "attempt")
    match kind:
        case "step":
            tensor = _tensor(m.get("tensor"), hidden_size)
            sample = checks.boolean(m.get("sample"), "sample")
            draft = _token_ids(m.get("draft", []), "draft", 0, MAX_DRAFT)
            if draft and (not sample or len(draft) >= tensor.shape[0]):
                raise WireError("a draft must end a sampled frame, after at least one token")
            loop = checks.address(m["loop"], "loop") if "loop" in m else ""
            head = checks.integer(m.get("head", 0), "head", high=MAX_TOKEN_ID)
            if head and (not loop or tensor.dtype == "int64" or tensor.shape[0] != len(draft) + 1):
                raise WireError("a split head's step holds a hidden state for each row it picks")
            core = _core(m["core"]) if "core" in m else None
            if core is not None and not head:
                raise WireError("only a split head's hidden states name the core they left")
            together = checks.integer(m.get("together", 0), "together", high=MAX_TOGETHER + 1)
            if together and (not head or draft):
                raise WireError("a wave's head holds one hidden state to score, without a draft")
            return StepFrame(
                epoch=epoch,
                session=session,
                step=checks.integer(m.get("step"), "step"),
                start=checks.integer(m.get("start"), "start"),
                tensor=tensor,
                origin=checks.address(m.get("origin"), "origin"),
                sample=sample,
                sampling=_sampling(m.get("sampling")),
                attempt=attempt,
                reserve=checks.integer(m.get("reserve", 0), "reserve"),
                draft=draft,
                loop=loop,
                until=checks.integer(m.get("until", 0), "until") if loop else 0,
                stops=_token_ids(m.get("stops", []), "stops", 0, MAX_STOPS) if loop else (),
                drafts=checks.integer(m.get("drafts", 0), "drafts", high=MAX_DRAFT + 1),
                head=head,
                core=core,
                together=together,
                ends=checks.integer(m.get("ends", 0), "ends"),
            )
        case "token":
            step = checks.integer(m.get("step"), "step")
            tokens = _token_ids(m.get("tokens"), "tokens", 1, MAX_DRAFT + 1)
            drafted = checks.integer(m.get("drafted", 0), "drafted", high=MAX_DRAFT + 1)
            if len(tokens) > drafted + 1:
                raise WireError(f"{len(tokens)} tokens from a pass that verified {drafted} drafted")
            return TokenFrame(epoch, session, step, tokens, attempt, drafted)
        case "pick":
            tokens = _token_ids(m.get("tokens"), "tokens", 1, MAX_DRAFT + 1)
            raw = checks.a_list(m.get("logits"), "logits")
            if len(raw) != len(tokens):
                raise WireError(f"{len(raw)} logits for {len(tokens)} picked tokens")
            logits = tuple(checks.number(v, "logit", MAX_LOGIT, -MAX_LOGIT) for v in raw)
            step = checks.integer(m.get("step"), "step")
            return PickFrame(epoch, session, step, tokens, logits, attempt)
        case "error":
            try:
                code = ErrorCode(checks.text(m.get("code"), "code"))
            except ValueError:
                raise WireError(f"unknown error code {m.get('code')!r}") from None
            message = m.get("msg")
            if not isinstance(message, str) or len(message) > 4096:
                raise WireError("msg must be a string of at most 4096 characters")
            step, have = (
                checks.integer(m.get("step"), "step"),
                checks.integer(m.get("have"), "have"),
            )
            return ErrorFrame(epoch, session, step, code, message, attempt, have)
        case "handoff":
            units = checks.a_list(m.get("units"), "units")
            if len(units) != 2:
                raise WireError("units must be [start, end]")
            start, end = (
                checks.integer(units[0], "units.start"),
                checks.integer(units[1], "units.end"),
            )
            if start >= end:
                raise WireError(f"units [{start}, {end}) is empty")
            return HandoffRequest(
                epoch,
                session,
                attempt,
                start,
                end,
                checks.integer(m.get("length"), "length"),
                checks.address(m.get("to"), "to"),
                checks.address(m.get("origin"), "origin"),
            )
        case "kv":
            keys, values = _kv(m.get("keys"), "keys"), _kv(m.get("values"), "values")
            if keys.shape != values.shape or keys.dtype != values.dtype:
                raise WireError("keys and values must have the same dtype and shape")
            return KVFrame(
                epoch,
                session,
                attempt,
                checks.integer(m.get("layer"), "layer"),
                keys,
                values,
                checks.address(m.get("origin"), "origin"),
                checks.boolean(m.get("final"), "final"),
                checks.integer(m.get("start", 0), "start"),
            )
        case "handoff-done":
            return HandoffDone(epoch, session, attempt, checks.integer(m.get("layers"), "layers"))
    raise WireError(f"unknown frame kind {kind!r}")


def _token_ids(raw: object, what: str, fewest: int, most: int) -> tuple[int, ...]:
    ids = checks.a_list(raw, what)
    if not fewest <= len(ids) <= most:
        raise WireError(f"{what} must hold {fewest} to {most} token ids")
    return tuple(checks.integer(t, what, high=MAX_TOKEN_ID) for t in ids)


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
    m = checks.a_map(raw, what)
    dtype = checks.text(m.get("dtype"), f"{what}.dtype")
    if dtype not in TENSOR_DTYPES:
        raise WireError(f"{what}.dtype {dtype!r} is not one of {', '.join(TENSOR_DTYPES)}")
    dims = checks.a_list(m.get("shape"), f"{what}.shape")
    if len(dims) > 4:
        raise WireError(f"{what}.shape has {len(dims)} dimensions, more than 4")
    shape = tuple(checks.integer(d, f"{what}.shape") for d in dims)
    data = m.get("data")
    if not isinstance(data, bytes):
        raise WireError(f"{what}.data must be bytes")
    expected = TENSOR_DTYPES[dtype] * math.prod(shape)
    if len(data) != expected:
        raise WireError(f"{what}.data has {len(data)} bytes, dtype x shape needs {expected}")
    return TensorData(dtype, shape, data)


def _core(raw: object) -> tuple[int, int]:
    pair = checks.a_list(raw, "core")
    if len(pair) != 2:
        raise WireError("core must be [host, core]")
    host = checks.integer(pair[0], "core's host", low=1, high=MAX_HOST)
    return host, checks.integer(pair[1], "core", high=MAX_CORE)


def _sampling(raw: object) -> Sampling:
    triple = checks.a_list(raw, "sampling")
    if len(triple) != 3:
        raise WireError("sampling must be [temperature, top_p, seed]")
    temperature = checks.number(triple[0], "temperature", MAX_TEMPERATURE)
    top_p = checks.number(triple[1], "top_p", 1.0, positive=True)
    return Sampling(temperature, top_p, checks.integer(triple[2], "seed", high=MAX_SEED))
