"""What a decode pass costs besides its products, in one process and split over three.

SmolLM2-135M, float32, one thread, one session decoding greedily after a 30-token prompt.
For transformers' layers and the fused ones (meshshard.model.fused), in turns:

- one process, the whole model: ms a token, and ms a decoder layer;
- the same layers' seven products alone (the floor a layer's other work sits on);
- three processes, each one shard of the 3-peer split of tools/bench_chain.py, in a ring of
  pipes (the last sends its token straight to the first, as a mesh does; no event loop, no
  sockets, no framing): each pass's CPU, summed, against the same shards run one after
  another in one process; and the ring's ms a token.

The ring is the floor of any chain of processes sharing this machine's cores: what it costs
them, against one process, before a mesh adds anything.

    python tools/bench_layers.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meshshard.chain.picks import Pick, better  # noqa: E402
from meshshard.model.products import LINEAR, ROWS, Product  # noqa: E402
from meshshard.model.shard import Shard  # noqa: E402

CUTS = (0, 8, 21, 32)  # a 3-peer plan of bench_chain's (the one it got on profiles of v7)
PROMPT = list(range(100, 130))
MODES = ("transformers", "fused")
BATCH_ROWS = (1, 2, 4, 8)
# A ring message's header: position, body size, and when it was sent (perf_counter, one
# clock for every process of a host).
HEADER = struct.Struct("<iid")


def load(start: int, end: int, mode: str) -> Shard:
    from bench_chain import embedded_model

    return Shard.load(embedded_model(), start, end, fuse=mode == "fused")


def all_products(shard: Shard) -> list[Product]:
    """The products of a shard's fused layers, and its head's."""
    out = [p for f in shard._fused if f is not None for p in (f.qkv, f.o, f.gate_up, f.down)]
    head = getattr(shard.lm_head, "product", None)
    return out + ([head] if isinstance(head, Product) else [])


def decode(shards: list[Shard], tokens: int) -> tuple[list[list[float]], list[int]]:
    """Each shard's pass CPU seconds for `tokens` greedy steps, and the tokens."""
    session = f"s{time.perf_counter_ns()}"
    x = torch.tensor(PROMPT)
    for shard in shards:
        x = shard.prefill(session, x)
    token, out, cpu = int(x.argmax()), [], [[] for _ in shards]
    for i in range(tokens):
        x = torch.tensor([token])
        for shard, times in zip(shards, cpu, strict=True):
            start = time.thread_time()
            x = shard.decode(session, x, len(PROMPT) + i)
            times.append(time.thread_time() - start)
        token = int(x.argmax())
        out.append(token)
    for shard in shards:
        shard.drop(session)
    return cpu, out


def batched(shard: Shard, rows: int, steps: int = 12) -> float:
    """Median ms of a whole-model decode pass of `rows` sessions (60 positions cached)."""
    sessions = [f"b{time.perf_counter_ns()}-{i}" for i in range(rows)]
    for s in sessions:
        shard.prefill(s, torch.arange(100, 160))
    times = []
    for step in range(steps):
        start = time.thread_time()
        shard.decode_batch(sessions, [torch.tensor([5 + step])] * rows)
        times.append(time.thread_time() - start)
    for s in sessions:
        shard.drop(s)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def products_alone(shard: Shard, tokens: int) -> float:
    """ms a layer for its seven products on one row."""
    h = torch.randn(1, shard.spec.hidden_size)
    times = []
    for _ in range(tokens):
        start = time.thread_time()
        for layer in shard.layers:
            a, m = layer.self_attn, layer.mlp
            q = F.linear(h, a.q_proj.weight)
            k, v = F.linear(h, a.k_proj.weight), F.linear(h, a.v_proj.weight)
            h = h + 1e-3 * F.linear(q, a.o_proj.weight) + 1e-3 * (k.sum() + v.sum())
            gate, up = F.linear(h, m.gate_proj.weight), F.linear(h, m.up_proj.weight)
            h = h + 1e-3 * F.linear(gate * up, m.down_proj.weight)
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3 / len(shard.layers)


def stage(
    index: int,
    mode: str,
    reader: Any,
    writer: Any,
    tokens: int,
    cuts: Sequence[int],
    head: int = 0,
    delay: float = 0.0,
) -> None:
    """One process of the ring (`reader.read(n)` up to n bytes of its input, `writer.write`
    all of its output): read a step, run its shard, pass the result on; the last
    stage's token goes straight back to the first, as in a mesh. With `head` rows of the
    vocabulary for the first stage (a split head, as a mesh's lone answer has), the last
    stage sends its decode steps' normed hidden state to the first instead, then its pick of
    the rest; the first scores its rows meanwhile and takes the better pick. A message is
    taken `delay` seconds after it was sent (a link's latency). Prints the median pass CPU
    (ms), the ms a token at the last stage (0 elsewhere), and at the first the tokens it was
    fed, once the ring stops."""
    shard = load(cuts[index], cuts[index + 1], mode)
    times: list[float] = []
    stamps: list[float] = []
    fed: list[int] = []
    vocab = shard.spec.vocab_size
    while True:
        position, body = receive(reader, delay)
        if position < 0:  # stop, passed round the ring once
            if not shard.is_last:
                writer.write(message(-1, b""))
            break
        if index == 0 and head and times and len(body) == 4 * shard.spec.hidden_size:  # hidden
            ours = Pick(*shard.pick(torch.frombuffer(bytearray(body), dtype=torch.float32)
                                    .view(1, -1), 0, head))  # fmt: skip
            logit, token = struct.unpack("<fi", receive(reader, delay)[1])
            body = torch.tensor(better(ours, Pick((logit,), (token,)))).numpy().tobytes()
        x = torch.frombuffer(bytearray(body), dtype=torch.int64 if index == 0 else torch.float32)
        x = x if index == 0 else x.view(-1, shard.spec.hidden_size)
        if index == 0 and x.shape[0] == 1:
            fed.append(int(x))
        start = time.thread_time()
        split = bool(head) and shard.is_last and x.shape[0] == 1
        out = shard.prefill("s", x, torch.arange(position, position + x.shape[0]), head=not split)
        if x.shape[0] == 1:
            times.append(time.thread_time() - start)
        if not shard.is_last:
            writer.write(message(position, out.numpy().tobytes()))
            continue
        stamps.append(time.perf_counter())
        if len(stamps) > tokens:
            writer.write(message(-1, b""))
            continue
        after = position + x.shape[0]
        if split:
            writer.write(message(after, out.reshape(1, -1).numpy().tobytes()))
            (logit,), (token,) = shard.pick(out.reshape(1, -1), head, vocab)
            writer.write(message(after, struct.pack("<fi", logit, token)))
            continue
        writer.write(message(after, torch.tensor([int(out.argmax())]).numpy().tobytes()))
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3 if stamps else 0.0
    print(f"{statistics.median(times) * 1e3:.3f} {per_token:.3f} {','.join(map(str, fed))}",
          flush=True)  # fmt: skip


def prompt_message() -> bytes:
    """The message that starts a ring: PROMPT's ids at position 0."""
    return message(0, torch.tensor(PROMPT, dtype=torch.int64).numpy().tobytes())


def message(position: int, body: bytes) -> bytes:
    """A ring's message: its header (position, size, when sent) and body."""
    return HEADER.pack(position, len(body), time.perf_counter()) + body


def receive(reader: Any, delay: float) -> tuple[int, bytes]:
    """The next message's position and body, `delay` seconds after it was sent at least."""
    position, size, sent = HEADER.unpack(_read(reader, HEADER.size))
    body = _read(reader, size)
    if (wait := sent + delay - time.perf_counter()) > 0:
        time.sleep(wait)
    return position, body


def _read(reader: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = reader.read(n - len(data))
        if not chunk:
            raise EOFError("a stage of the ring closed")
        data += chunk
    return data


def pipe_chain(
    mode: str, tokens: int, cuts: Sequence[int] = CUTS, head: int = 0
) -> tuple[list[float], float]:
    """Three stage processes in a ring of pipes, each the units between two `cuts`, this one
    only starting it (the head split at `head` rows, if any): each stage's median pass CPU
    (ms), and ms a token."""
    pipes = [os.pipe() for _ in range(3)]  # into stage 0, 1, 2
    ends = [(pipes[k][0], pipes[(k + 1) % 3][1]) for k in range(3)]  # each stage's in, out
    at = ",".join(map(str, cuts))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--stage", str(k), mode, *map(str, fds), str(tokens), at,
             str(head)],
            pass_fds=fds, stdout=subprocess.PIPE, text=True,
        )
        for k, fds in enumerate(ends)
    ]  # fmt: skip
    for k, (r, w) in enumerate(pipes):
        os.close(r)
        if k > 0:
            os.close(w)
    with os.fdopen(pipes[0][1], "wb", buffering=0) as ring:
        ring.write(prompt_message())
        printed = [p.communicate(timeout=600)[0].split() for p in procs]
    return [float(out[0]) for out in printed], float(printed[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stage:
        index, mode, rfd, wfd, tokens, cuts, head = args.stage
        at = [int(c) for c in cuts.split(",")]
        reader, writer = os.fdopen(int(rfd), "rb", buffering=0), os.fdopen(int(wfd), "wb", 0)
        stage(int(index), mode, reader, writer, int(tokens), at, int(head))
        return
    whole = {m: [load(0, 32, m)] for m in MODES}
    split = {m: [load(a, b, m) for a, b in itertools.pairwise(CUTS)] for m in MODES}
    layers = len(whole["fused"][0].layers)
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    answers = {}
    for _ in range(args.repeats):
        for mode in MODES:
            got = rows[mode]
            cpu, answers[mode] = decode(whole[mode], args.tokens)
            got.setdefault("token", []).append(statistics.median(cpu[0]) * 1e3)
            cpu, _ = decode(split[mode], args.tokens)
            got.setdefault("split", []).append(sum(statistics.median(c) for c in cpu) * 1e3)
            passes, per_token = pipe_chain(mode, args.tokens)
            got.setdefault("pipes", []).append(sum(passes))
            got.setdefault("pipes_token", []).append(per_token)
    products = products_alone(whole["fused"][0], args.tokens)
    # Passes of several rows, with every product through torch's linear too (what the fused
    # layers would do without the forms chosen at load).
    wide: dict[str, dict[int, list[float]]] = {m: {} for m in (*MODES, "fused, linear")}
    chosen = {id(p): p.forms for p in all_products(whole["fused"][0])}
    for _ in range(args.repeats):
        for name in wide:
            shard = whole["transformers" if name == "transformers" else "fused"][0]
            for p in all_products(whole["fused"][0]):
                p.forms = (LINEAR,) * len(ROWS) if name == "fused, linear" else chosen[id(p)]
            for n in BATCH_ROWS:
                wide[name].setdefault(n, []).append(batched(shard, n))
    med = {m: {k: statistics.median(v) for k, v in rows[m].items()} for m in MODES}
    print(f"# SmolLM2-135M float32, 1 thread, {args.tokens} tokens after a {len(PROMPT)}-token "
          f"prompt; medians of {args.repeats} runs in turns; pass CPU in ms")  # fmt: skip
    print("# layers         whole model  3 shards, 1 process  3 processes  ratio  "
          "pipe chain ms/token")  # fmt: skip
    for mode in MODES:
        m = med[mode]
        print(f"{mode:16} {m['token']:11.2f} {m['split']:20.2f} {m['pipes']:12.2f} "
              f"{m['split'] / m['pipes']:6.3f} {m['pipes_token']:12.2f}")  # fmt: skip
    print(
        f"# the products of the {layers} decoder layers alone: {products * layers:.2f} ms "
        f"({products:.3f} a layer; the head is not in it)"
    )
    speedup = med["transformers"]["token"] / med["fused"]["token"]
    same = answers["fused"] == answers["transformers"]
    print(f"# fused vs transformers, whole model: {speedup:.3f}x; same greedy tokens: {same}")
    print(f"# whole-model passes of {', '.join(map(str, BATCH_ROWS))} rows, ms (median of "
          f"{args.repeats}):")  # fmt: skip
    for name, by_rows in wide.items():
        print(
            f"#   {name}: " + ", ".join(f"{statistics.median(by_rows[n]):.1f}" for n in BATCH_ROWS)
        )
    print("# every run (whole, 3 shards, 3 processes, pipe chain ms/token):")
    for mode in MODES:
        runs = zip(
            *(rows[mode][k] for k in ("token", "split", "pipes", "pipes_token")), strict=True
        )
        print(f"#   {mode}: " + "; ".join(", ".join(f"{v:.2f}" for v in r) for r in runs))


if __name__ == "__main__":
    main()
