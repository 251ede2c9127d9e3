"""A testbed plan's shards as bare processes in a ring over TCP, each in its host's namespace
and CPU share: what the testbed's own hardware allows one answer, with nothing of a mesh.

The stages are tools/bench_layers.py's (the last stage's token goes straight to the first;
with a split head, its hidden state, then its pick of the rest), here over sockets between
the hosts' addresses, so through the testbed's shaped links, each message taken by its
reader the link's delay after it was sent (the testbed's `delay_ms` of both hosts, as a
mesh's raw links are delayed there). Needs root and the testbed up (`tools/testbed.py up`);
the peers idle meanwhile.

    python tools/ring.py peers/lan-3.toml desk:0:17,laptop:17:32 [--head ROWS] [--tokens 64]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from testbed import Testbed, in_share  # noqa: E402

PORT = 7170  # beside the peers' ports, on the testbed's own addresses
CONNECT_S = 120  # a stage on a quarter core takes a while to start


class _Prefixed:
    """The first stage's input: the prompt's step, then what the last stage sends."""

    def __init__(self, first: bytes, rest: socket.socket) -> None:
        self.first, self.rest = first, rest

    def read(self, n: int) -> bytes:
        if self.first:
            out, self.first = self.first[:n], self.first[n:]
            return out
        return self.rest.recv(n)


class _Sender:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


def run_stage(
    index: int, cuts: Sequence[int], head: int, tokens: int, me: str, after: str, delay: float
) -> None:
    """One stage, in its host's namespace: listen at `me`, connect to the next stage at
    `after`, take the previous stage's connection, then run bench_layers' stage over them,
    each message taken `delay` seconds after it was sent (the link from the previous)."""
    import torch
    from bench_layers import prompt_message, stage

    torch.set_num_threads(1)
    listener = socket.create_server((me, PORT))
    end = time.monotonic() + CONNECT_S
    while True:
        try:
            out = socket.create_connection((after, PORT), timeout=5)
            break
        except OSError:
            if time.monotonic() > end:
                msg = f"error: the next stage at {after}:{PORT} never listened"
                raise SystemExit(msg) from None
            time.sleep(0.1)
    listener.settimeout(CONNECT_S)
    into, _ = listener.accept()
    for s in (out, into):
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = _Prefixed(prompt_message() if index == 0 else b"", into)
    stage(index, "fused", reader, _Sender(out), tokens, cuts, head, delay)


def ring(
    tb: Testbed, stages: Sequence[tuple[str, int, int]], head: int = 0, tokens: int = 64
) -> tuple[list[float], float, list[int]]:
    """The stages (host name, first unit, end) as a ring of bare processes, each in its host's
    namespace and CPU share (the head split at `head` rows, if any), a message between two
    hosts taken their two delays after it was sent, as the testbed's transport delays a
    mesh's: each stage's median pass CPU (ms), ms a token, and the greedy tokens the first
    stage was fed."""
    index = {h.name: i for i, h in enumerate(tb.hosts)}
    hosts = [index[name] for name, _, _ in stages]
    cuts = ",".join(map(str, [s[1] for s in stages] + [stages[-1][2]]))
    procs = []
    try:
        for k, i in enumerate(hosts):
            after = tb.address(hosts[(k + 1) % len(hosts)])
            before = hosts[k - 1]
            ms = tb.hosts[before].delay_ms + tb.hosts[i].delay_ms if before != i else 0.0
            procs.append(in_share(
                tb, i, __file__, "--stage", str(k), cuts, str(head), str(tokens),
                tb.address(i), after, str(ms / 1000),
            ))  # fmt: skip
        printed = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, printed, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"error: a stage of the ring failed: {err.strip()[-500:]}")
    fields = [out.split() for out, _ in printed]
    tokens_fed = [int(t) for t in fields[0][2].split(",")] if len(fields[0]) > 2 else []
    return [float(f[0]) for f in fields], float(fields[-1][1]), tokens_fed


def parse_stages(text: str) -> list[tuple[str, int, int]]:
    """`desk:0:17,laptop:17:32` -> [("desk", 0, 17), ("laptop", 17, 32)]."""
    out = []
    for part in text.split(","):
        name, start, end = part.split(":")
        out.append((name, int(start), int(end)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("testbed", nargs="?", type=Path)
    parser.add_argument("stages", nargs="?", type=parse_stages)
    parser.add_argument("--head", type=int, default=0, help="vocabulary rows the first scores")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stage", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        index, cuts, head, tokens, me, after, delay = args.stage
        at = [int(c) for c in cuts.split(",")]
        run_stage(int(index), at, int(head), int(tokens), me, after, float(delay))
        return
    if args.testbed is None or args.stages is None:
        parser.error("name a testbed and its plan's stages")
    passes, per_token, _ = ring(Testbed.load(args.testbed), args.stages, args.head, args.tokens)
    print(f"passes (CPU ms): {', '.join(f'{p:.1f}' for p in passes)}; {per_token:.1f} ms a "
          f"token, {1000 / per_token:.1f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
