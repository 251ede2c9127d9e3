"""Fuzz the edges a hostile LAN host can reach, for a fixed time budget, and count crashes.

    python tools/fuzz_wire.py [--seconds 60] [--seed 1]

Targets:
- `open+frame`: a data-plane message as a stage receives it: envelope, then frame decoder;
- `frame`: the frame decoder alone (as in a mesh run with --insecure);
- `gossip`: the control decoder, then a live control node's handler for what decodes.

Inputs: random bytes, valid messages with bits flipped, bytes cut or inserted, CBOR fields
replaced by random values, and validly sealed envelopes around such payloads (an insider's
key, a hostile payload). A crash is any exception other than the refusals the code promises
(WireError, AuthError, TransportError). Prints inputs tried and crashes per target; exits 1
if any crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshshard.config import TEST_TIMINGS  # noqa: E402
from meshshard.mesh.node import ControlNode, TransportError  # noqa: E402
from meshshard.model.batching import BATCHES  # noqa: E402
from meshshard.security import DATA, AuthError, Keyring, Sealer  # noqa: E402
from meshshard.types import (  # noqa: E402
    Epoch,
    LinkStat,
    Member,
    NodeId,
    PlanRecord,
    PlanStage,
    Profile,
    State,
    UnitCost,
)
from meshshard.wire import (  # noqa: E402
    ControlMessage,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    HandoffRequest,
    KVFrame,
    PickFrame,
    Ping,
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

EXPECTED = (WireError, AuthError, TransportError)
HIDDEN = 576


def seeds() -> tuple[list[bytes], list[bytes]]:
    """Valid data frames and control messages to mutate."""
    e = Epoch(3, "peer-a")
    hidden = TensorData("float32", (2, HIDDEN), bytes(8 * HIDDEN))
    ids = TensorData("int64", (3,), bytes(24))
    kv = TensorData("float32", (1, 3, 2, 64), bytes(4 * 3 * 2 * 64))
    sampling = Sampling(0.7, 0.9, 42)
    one = TensorData("float32", (1, HIDDEN), bytes(4 * HIDDEN))
    hidden3 = TensorData("float32", (3, HIDDEN), bytes(12 * HIDDEN))
    split = StepFrame(e, "a/1", 5, 11, one, "127.0.0.1:7000", True, sampling)
    split = replace(split, loop="127.0.0.1:7002", until=64)
    frames = [
        StepFrame(e, "a/1", 4, 10, hidden, "127.0.0.1:7000", True, sampling, 2),
        StepFrame(e, "a/1", 0, 0, ids, "127.0.0.1:7000", False, sampling),
        TokenFrame(e, "a/1", 4, (100,), 1),
        ErrorFrame(e, "a/1", 4, ErrorCode.CACHE_MISS, "short", 1, 7),
        DropFrame(e, "a/1"),
        HandoffRequest(e, "a/1", 1, 3, 9, 40, "127.0.0.1:7001", "127.0.0.1:7000"),
        KVFrame(e, "a/1", 1, 5, kv, kv, "127.0.0.1:7000", True),
        replace(split, head=24576),
        PickFrame(e, "a/1", 5, (30000, 7), (17.5, 2.0), 1),
        # A chain feeding itself and speculating, a first stage's share of a split head on
        # the core of its own, a wave's head, a pass's confirmed drafts: every optional field.
        replace(
            split, tensor=hidden3, draft=(7, 8), stops=(2, 0), drafts=4, head=24576, core=(3, 1)
        ),
        replace(split, head=49152, together=2),
        TokenFrame(e, "a/1", 4, (100, 101, 102), 1, drafted=2),
    ]
    member = Member(NodeId("peer-b"), "127.0.0.1:7001", 5, State.ALIVE, 1, 2, e)
    stages = (PlanStage(NodeId("peer-b"), 0, 32),)
    plan = PlanRecord(e, "m", "latency", stages, 10.0, 10.0, "x", head_share=0.45)
    profile = Profile(
        NodeId("peer-b"), 2, "m", 1e9, (1.0,) * 32, True,
        batch_ms=tuple((1.5,) * 32 for _ in BATCHES),
        links={NodeId("peer-c"): LinkStat(900, 0.5)},
        load=2, step_ms=30.0, overhead_ms=2.5, pass_overhead_ms=1.5, pace=1.1, batch_pace=0.9,
        device="cpu float32", frame=1 << 20, raw=7101,
    )  # fmt: skip
    control: list[ControlMessage] = [
        Ping(member, (member,), plan),
        Sync(member, (member,), (profile,), plan),
    ]
    return [encode_frame(f) for f in frames], [encode(m) for m in control]


def check_seeds(frames: list[bytes], control: list[bytes]) -> None:
    """Every seed decodes: one the wire refuses would leave its kind's fields unfuzzed (until
    the thirty-third session the Sync seed's profile passed its links where its batch
    timings go, and every Sync mutated was refused before the fields past it were read)."""
    for data in frames:
        decode_frame(data, HIDDEN)
    for data in control:
        decode(data)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    match rng.randrange(5):
        case 0:  # flip bits
            for _ in range(rng.randint(1, 8)):
                if b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        case 1:  # cut
            del b[rng.randrange(len(b) + 1) :]
        case 2:  # insert garbage
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.randbytes(rng.randint(1, 32))
        case 3:  # replace one CBOR field's value
            try:
                body = cbor2.loads(bytes(b))
                key = rng.choice(list(body))
                body[key] = random_value(rng, 3)
                return bytes(cbor2.dumps(body))
            except Exception:
                return bytes(b)
        case _:
            return rng.randbytes(rng.randint(0, 512))
    return bytes(b)


def random_value(rng: random.Random, depth: int) -> Any:
    kinds: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice([0, -1, 2**63, 2**64 + 5, -(2**70), rng.randint(-9, 9**9)]),
        lambda: rng.choice([float("nan"), float("inf"), -0.0, 1e308, rng.random()]),
        lambda: rng.randbytes(rng.randint(0, 16)),
        lambda: "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12))),
    ]
    if depth > 0:
        kinds += [
            lambda: [random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))],
            lambda: {str(rng.randint(0, 9)): random_value(rng, depth - 1) for _ in range(3)},
        ]
    return rng.choice(kinds)()


def control_node() -> ControlNode:
    class Silent:
        async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage:
            raise TransportError("offline")

        async def measure(self, addr: str, timeout: float) -> LinkStat:
            raise TransportError("offline")

    me = Member(NodeId("fuzz"), "127.0.0.1:7999", 1, State.ALIVE)
    units = [UnitCost(f"u{i}", 10**6, 1536, 2304) for i in range(32)]
    profile = Profile(NodeId("fuzz"), 1, "m", 1e9, (1.0,) * 32, True)
    return ControlNode(
        me=me, profile=profile, units=units, timings=TEST_TIMINGS, transport=Silent()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # a refusal a second is the point, not news
    rng = random.Random(args.seed)
    frames, control = seeds()
    check_seeds(frames, control)
    keyring = Keyring((bytes(range(32)),))
    insider = Sealer(keyring, "fuzz")
    receiver = Sealer(keyring, "fuzz")
    loop = asyncio.new_event_loop()

    async def made() -> ControlNode:
        return control_node()  # a node reads its clock off the running loop

    node = loop.run_until_complete(made())
    tried = {"open+frame": 0, "frame": 0, "gossip": 0}
    valid = dict.fromkeys(tried, 0)  # inputs that decoded into a message (reached the core)
    crashes: dict[str, list[str]] = {k: [] for k in tried}

    def attempt(target: str, run: Callable[[bytes], object], data: bytes) -> None:
        tried[target] += 1
        try:
            run(data)
            valid[target] += 1
        except EXPECTED:
            pass
        except Exception:
            crashes[target].append(traceback.format_exc(limit=3))

    def gossip(data: bytes) -> None:
        msg = decode(data)
        loop.run_until_complete(node.handle(msg))

    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        frame = mutate(rng, rng.choice(frames))
        wrapped = insider.seal(DATA, frame) if rng.random() < 0.5 else mutate(rng, frame)
        attempt("open+frame", lambda d: decode_frame(receiver.open(DATA, d), HIDDEN), wrapped)
        attempt("frame", lambda d: decode_frame(d, HIDDEN), frame)
        attempt("gossip", gossip, mutate(rng, rng.choice(control)))
    loop.close()
    print(f"fuzzed for {args.seconds:.0f} s, seed {args.seed}")
    print(f"{'target':<12} {'inputs':>10} {'decoded':>10} {'crashes':>8}")
    for target, n in tried.items():
        print(f"{target:<12} {n:>10} {valid[target]:>10} {len(crashes[target]):>8}")
    for target, found in crashes.items():
        for trace in found[:3]:
            print(f"\n{target} crash:\n{trace}")
    return 1 if any(crashes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
