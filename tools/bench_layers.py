"""What a decode pass costs besides its products, in one process and split over three.

SmolLM2-135M, float32, one thread, one session decoding greedily after a 30-token prompt.
For transformers' layers and the fused ones (meshshard.model.fused), in turns:

- one process, the whole model: ms a token, and ms a decoder layer;
- the same layers' seven products alone (the floor a layer's other work sits on);
- three processes, each one shard of the 3-peer split of tools/bench_chain.py, passing the
  activations through pipes (no event loop, no sockets, no mesh): each pass's CPU, summed,
  against the same shards run one after another in one process.

The last shows what a chain of processes sharing a CPU costs before any networking: each
process wakes to a pass with its own interpreter and dispatch state gone cold.

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
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meshshard.model.shard import Shard  # noqa: E402

CUTS = (0, 8, 21, 32)  # the plan bench_chain's 3 peers get
PROMPT = list(range(100, 130))
MODES = ("transformers", "fused")


def model_dir() -> Path:
    from meshshard.config import Config
    from meshshard.model.source import resolve_model

    config = Config()
    return resolve_model(config.model, config.cache_dir)


def load(start: int, end: int, mode: str) -> Shard:
    return Shard.load(model_dir(), start, end, fuse=mode == "fused")


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


def stage(index: int, mode: str, rfd: int, wfd: int) -> None:
    """One process of the pipe chain: read a step, run its shard, write the result; print
    the median pass CPU (ms) when the input closes."""
    shard = load(CUTS[index], CUTS[index + 1], mode)
    reader, writer = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
    times = []
    while header := _read(reader, 8):
        position, size = struct.unpack("<ii", header)
        body = _read(reader, size)
        x = torch.frombuffer(bytearray(body), dtype=torch.int64 if index == 0 else torch.float32)
        x = x if index == 0 else x.view(-1, shard.spec.hidden_size)
        start = time.thread_time()
        out = shard.prefill("s", x, torch.arange(position, position + x.shape[0]))
        data = struct.pack("<q", int(out.argmax())) if shard.is_last else out.numpy().tobytes()
        if x.shape[0] == 1:
            times.append(time.thread_time() - start)
        writer.write(struct.pack("<ii", position, len(data)) + data)
    print(f"{statistics.median(times) * 1e3:.3f}", flush=True)


def _read(reader: object, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = reader.read(n - len(data))  # type: ignore[attr-defined]
        if not chunk:
            return b""
        data += chunk
    return data


def pipe_chain(mode: str, tokens: int) -> tuple[list[float], float]:
    """Three stage processes in a ring through this one: each stage's median pass CPU (ms),
    and ms a token."""
    pipes = [os.pipe() for _ in range(4)]
    ends = [(pipes[k][0], pipes[k + 1][1]) for k in range(3)]  # each stage's input, output
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--stage", str(k), mode, *map(str, fds)],
            pass_fds=fds, stdout=subprocess.PIPE, text=True,
        )
        for k, fds in enumerate(ends)
    ]  # fmt: skip
    for k, (r, w) in enumerate(pipes):
        if k > 0:
            os.close(w)
        if k < 3:
            os.close(r)
    to_first = os.fdopen(pipes[0][1], "wb", buffering=0)
    from_last = os.fdopen(pipes[3][0], "rb", buffering=0)

    def step(position: int, ids: list[int]) -> int:
        body = torch.tensor(ids, dtype=torch.int64).numpy().tobytes()
        to_first.write(struct.pack("<ii", position, len(body)) + body)
        _, size = struct.unpack("<ii", _read(from_last, 8))
        return int(struct.unpack("<q", _read(from_last, size))[0])

    token = step(0, PROMPT)
    start = time.perf_counter()
    for i in range(tokens):
        token = step(len(PROMPT) + i, [token])
    per_token = (time.perf_counter() - start) / tokens * 1e3
    to_first.close()
    passes = [float(p.communicate(timeout=120)[0].strip()) for p in procs]
    from_last.close()
    return passes, per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stage:
        index, mode, rfd, wfd = args.stage
        stage(int(index), mode, int(rfd), int(wfd))
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
    print("# every run (whole, 3 shards, 3 processes, pipe chain ms/token):")
    for mode in MODES:
        runs = zip(
            *(rows[mode][k] for k in ("token", "split", "pipes", "pipes_token")), strict=True
        )
        print(f"#   {mode}: " + "; ".join(", ".join(f"{v:.2f}" for v in r) for r in runs))


if __name__ == "__main__":
    main()
