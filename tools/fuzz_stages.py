"""Insider fuzzing of the data plane: a key holder sends real stages sealed frames that the
wire takes, with adversarial values, while real answers run.

    python tools/fuzz_stages.py [--seconds 120] [--seed 1] [--json FILE]

Three real peers on loopback (300 MB each, so the chain takes all three). For a fixed time the
harness builds each kind of data frame (steps of ids and of hidden states, a chain feeding
itself and speculating, a split head's and a wave's, tokens, picks, errors, drops, handoff
requests and their answers, KV) on the plan in force, replaces one to three fields anywhere
in them, mostly with a value of the same type, from a catalogue (the vocabulary's edges,
positions at and past the context, epochs old and new, shapes of the wrong width, addresses
of the peers and of no one), keeps what the wire takes (tools/fuzz_wire.py covers what it
refuses), and sends it, sealed, on a data socket to a random stage, playing the origin its
answers go to. Meanwhile a client asks the mesh the same question again and again.

Target: 0 peers crashed, no step failed inside a stage (`internal`, "stage failed" in a
log), every answer that ran the single-process reference, also the one asked right after.
Some are refused for room (429): the fuzzer's sessions hold KV memory, until their origin is
found gone from the mesh (a sweep every 2 s) or, where they name a member as their origin
(as a key holder can), until they go quiet (600 s).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from fuzz_insider import arguments, at, chat, paths, put, three_peers  # noqa: E402
from support.dataplane import channel_to, origin_at  # noqa: E402
from support.procs import Peer, mesh_key, wait_for_agreement, wait_for_chain  # noqa: E402
from support.reference import greedy_answer  # noqa: E402

from meshshard.chain.channel import FrameCodec  # noqa: E402
from meshshard.chain.tensors import ids_to_wire  # noqa: E402
from meshshard.config import Config, default_cache_dir  # noqa: E402
from meshshard.model.shard import load_spec  # noqa: E402
from meshshard.model.source import ensure_embedded  # noqa: E402
from meshshard.security import Keyring, Sealer  # noqa: E402
from meshshard.types import Epoch  # noqa: E402
from meshshard.wire import (  # noqa: E402
    DataFrame,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    PickFrame,
    Sampling,
    StepFrame,
    TensorData,
    TokenFrame,
    WireError,
    decode_frame,
    encode_frame,
)

BASE = 7260
ORIGIN_PORT = 7299
PROMPT = "What is the capital of France?"
NEW = 12


def described(status: dict[str, Any]) -> dict[str, Any]:
    """What the fuzzer needs of the mesh: from a peer's status and the embedded model."""
    spec = load_spec(ensure_embedded(default_cache_dir()))
    term, coordinator = status["plan"]["epoch"]
    return {
        "ids": [m["id"] for m in status["members"]],
        "addrs": [m["addr"] for m in status["members"]],
        "origin": f"127.0.0.1:{ORIGIN_PORT}", "term": term, "coordinator": coordinator,
        "hidden": spec.hidden_size, "vocab": spec.vocab_size,
        "kv": (spec.num_kv_heads, spec.head_dim),
    }  # fmt: skip


def templates(
    epoch: Epoch, origin: str, loop: str, hidden: int, vocab: int, kv: tuple[int, int]
) -> list[DataFrame]:
    """One frame of each kind the wire takes, on the plan in force."""

    def floats(rows: int, width: int = hidden) -> TensorData:
        return TensorData("float32", (rows, width), bytes(4 * rows * width))

    ids = ids_to_wire((1, 2, 3))
    greedy, seeded = Sampling(0.0, 1.0, 0), Sampling(0.7, 0.9, 42)
    heads, dim = kv
    cache = TensorData("float32", (1, heads, 4, dim), bytes(16 * heads * dim))
    step = StepFrame(epoch, "fz/1", 0, 0, ids, origin, True, greedy, reserve=64)
    fed = replace(step, tensor=floats(1), step=5, start=11, loop=loop, until=64)
    return [
        step,
        replace(step, sample=False, sampling=seeded),
        replace(step, tensor=floats(3), start=3, step=1),
        replace(fed, tensor=floats(3), draft=(7, 8), stops=(2,), drafts=4),
        replace(fed, head=vocab // 2, core=(1, 0)),
        replace(fed, head=vocab, together=2),
        TokenFrame(epoch, "fz/1", 4, (100, 101), 1, drafted=1),
        PickFrame(epoch, "fz/1", 5, (30, 7), (17.5, 2.0), 0),
        ErrorFrame(epoch, "fz/1", 4, ErrorCode.CACHE_MISS, "short", 0, 2),
        DropFrame(epoch, "fz/1"),
        HandoffRequest(epoch, "fz/1", 0, 1, 9, 4, loop, origin),
        KVFrame(epoch, "fz/1", 0, 3, cache, cache, origin, True),
        HandoffDone(epoch, "fz/1", 0, 3),
    ]


def catalogue(rng: random.Random, mesh: dict[str, Any], old: Any) -> Any:
    """An adversarial value for a field that held `old`: mostly of its type (so that the wire
    takes it and the stage must judge it), now and then of another."""
    vocab, hidden, term = mesh["vocab"], mesh["hidden"], mesh["term"]
    context = Config.context_tokens  # the peers' --context
    ints = [0, 1, -1, 2, 3, 7, 31, 32, 33, vocab - 1, vocab, vocab // 2, hidden, hidden + 1,
            context - 1, context, context + 1, term - 1, term + 1, 2**31 - 1, 2**53]  # fmt: skip
    floats = [0.0, -0.0, 1.0, 0.5, 1e-30, 1e30, 3.4e38, -1.0, 99.0]
    strings = ["fz/1", "fz/2", "fz/3", "", mesh["origin"], "127.0.0.1:9", *mesh["addrs"],
               *mesh["ids"], "stale-epoch", "float32", "bfloat16", "int64"]  # fmt: skip
    by_type = {
        bool: lambda: rng.choice([True, False]),
        int: lambda: rng.choice(ints),
        float: lambda: rng.choice(floats),
        str: lambda: rng.choice(strings),
        bytes: lambda: rng.randbytes(rng.choice([0, 8, 24, 4 * hidden])),
        list: lambda: [rng.choice(ints) for _ in range(rng.randint(0, 4))],
        dict: lambda: {  # a tensor
            "dtype": rng.choice(["float32", "int64", "float16"]),
            "shape": [rng.choice([1, 2, 3]), rng.choice([hidden, hidden - 1, 1])],
            "data": rng.randbytes(8) * (hidden // 2),
        },
    }
    same = by_type.get(type(old))
    if same is not None and rng.random() < 0.9:
        return same()
    return rng.choice(list(by_type.values()))()


def mutated(rng: random.Random, frame: DataFrame, mesh: dict[str, Any]) -> DataFrame | None:
    """The frame with one to three fields replaced, or None where the wire refuses it."""
    body = cbor2.loads(encode_frame(frame))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths(body))
        put(body, path, catalogue(rng, mesh, at(body, path)))
    try:
        return decode_frame(bytes(cbor2.dumps(body)), mesh["hidden"])
    except (WireError, ValueError, TypeError, OverflowError):
        return None


async def fuzz(
    rng: random.Random, peers: list[Peer], codec: FrameCodec, mesh: dict[str, Any], seconds: float
) -> tuple[Counter[str], Counter[str]]:
    """Frames sent by kind, and what came back to the origin by kind (errors by code)."""
    sent: Counter[str] = Counter()
    back: Counter[str] = Counter()

    def got(frame: DataFrame) -> None:
        back[frame.code if isinstance(frame, ErrorFrame) else type(frame).__name__] += 1

    kinds = templates(
        Epoch(mesh["term"], mesh["coordinator"]), mesh["origin"], mesh["addrs"][0],
        mesh["hidden"], mesh["vocab"], mesh["kv"],
    )  # fmt: skip
    count = 0
    async with origin_at(ORIGIN_PORT, codec, got):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peer = rng.choice(peers)
            try:
                async with channel_to(peer.addr, codec) as (ws, channel):
                    for _ in range(50):
                        # Mostly a new session, as a frame of an ended one ends unread; now
                        # and then one of the last few, whose state a stage may hold.
                        n = rng.randint(max(0, count - 8), count) if rng.random() < 0.3 else count
                        count += 1
                        template = replace(rng.choice(kinds), session=f"fz/{n}")
                        frame = mutated(rng, template, mesh)
                        if frame is None:
                            sent["refused at the wire"] += 1
                            continue
                        for record in channel.seal(frame):
                            await ws.send_bytes(record)
                        sent[type(frame).__name__] += 1
                    await asyncio.sleep(0.05)
            except (OSError, WireError, TimeoutError) as e:
                sent[f"socket: {type(e).__name__}"] += 1  # the stage closed it: counted
        await asyncio.sleep(2)  # the last replies
    return sent, back


def judged(got: str, reference: str) -> str:
    """An answer as counted: the reference, refused for room (a key holder's sessions may
    hold a stage's KV memory, as any member's may: the API answers 429), or anything else."""
    if got == reference:
        return "correct"
    return "refused for room (429)" if "HTTP Error 429" in got else f"other: {got[:80]}"


def asking(peer: Peer, reference: str, stop: threading.Event, answers: Counter[str]) -> None:
    while not stop.is_set():
        answers[judged(chat(peer), reference)] += 1


def failures(logs: Path) -> list[str]:
    """Lines of the peers' logs that say a step failed inside a stage or a loop broke."""
    marks = ("stage failed", "Traceback", "round failed")
    return [
        line.strip()
        for log in sorted(logs.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if any(m in line for m in marks)
    ]


def main() -> int:
    args = arguments(__doc__ or "")
    rng = random.Random(args.seed)
    reference = greedy_answer(PROMPT, NEW)
    logs = Path(tempfile.mkdtemp(prefix="fuzz-stages-"))
    peers = three_peers(BASE, logs)
    stop, answers = threading.Event(), Counter[str]()
    try:
        wait_for_chain(peers[0], 3)
        status = wait_for_agreement(peers, 120)
        mesh = described(status)
        codec = FrameCodec(Sealer(Keyring.load(mesh_key(logs)), "meshshard"))
        client = threading.Thread(target=asking, args=(peers[0], reference, stop, answers))
        client.start()
        sent, back = asyncio.run(fuzz(rng, peers, codec, mesh, args.seconds))
        stop.set()
        client.join()
        crashed = [p.name for p in peers if p.proc is None or p.proc.poll() is not None]
        final = chat(peers[0]) if not crashed else "no answer: a peer crashed"
        answers[f"after: {judged(final, reference)}"] += 1
    finally:
        stop.set()
        for p in peers:
            p.stop()
    failed = failures(logs)
    result = {
        "seconds": args.seconds, "seed": args.seed, "sent": dict(sent), "back": dict(back),
        "peers_crashed": crashed, "failures_logged": len(failed), "answers": dict(answers),
    }  # fmt: skip
    print(f"stage fuzz: {args.seconds:.0f} s, seed {args.seed}, 3 real peers")
    print(f"frames sent      {sum(n for k, n in sent.items() if k != 'refused at the wire')}"
          f" {dict(sent)}")  # fmt: skip
    print(f"came back        {dict(back)}")
    print(f"peers crashed    {len(crashed)} {crashed}")
    print(f"failures logged  {len(failed)}")
    for line in failed[:5]:
        print(f"  {line[:200]}")
    print(f"answers          {dict(answers)} (the reference: {reference!r})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    wrong = [a for a in answers if a.startswith(("other", "after: other"))]
    ok = not crashed and not failed and not wrong and answers["correct"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
