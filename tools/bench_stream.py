"""How steadily tokens reach a client: answers asked at once of bench_chain's 2-peer loopback
mesh (600 MB each, `--context 4096`, the prefill gap's mesh), each read off a plain socket,
every read timed. Per answer: its gaps between reads after the first three tokens, the median
and the longest, and the share of tokens that came in the same read or within 5 ms of the one
before (bunched: held somewhere and let go together).

    python tools/bench_stream.py --answers 2 --tokens 40 --repeats 3

docs/experiments/token-bunching.txt holds runs of it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_chain  # noqa: E402

BUNCHED_S = 0.005
SKIP = 3  # tokens left out at the start: they follow the answer's own prefill


def arrivals(port: int, tokens: int) -> list[tuple[float, int]]:
    """(time, tokens in it) of every read of one streamed answer."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": bench_chain.PROMPT}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        # The server closes after the answer, so the reads end there even where "[DONE]"
        # comes split across two of them.
        "Connection: close\r\n\r\n"
    )
    reads: list[tuple[float, int]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head.encode() + body)
        while chunk := s.recv(65536):
            pieces = chunk.count(b'"content": "') - chunk.count(b'"content": ""')
            reads.append((time.perf_counter(), pieces))
            if b"[DONE]" in chunk:
                break
    return reads


def ask(into: list[list[tuple[float, int]]], i: int, port: int, tokens: int) -> None:
    into[i] = arrivals(port, tokens)


def summary(reads: list[tuple[float, int]]) -> tuple[int, float, float, float]:
    """Tokens, median and longest gap (ms) between tokens, share of tokens bunched."""
    stamps = [t for t, n in reads for _ in range(n)][SKIP:]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    bunched = sum(g < BUNCHED_S for g in gaps) / max(len(gaps), 1)
    return len(stamps) + SKIP, statistics.median(gaps) * 1e3, max(gaps) * 1e3, bunched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs, bench_chain.gap_mesh(Path(logs)) as procs:
        print(bench_chain.plan_words(procs[0]))
        port = int(procs[0].url.rsplit(":", 1)[1])
        for rep in range(1, args.repeats + 1):
            reads: list[list[tuple[float, int]]] = [[] for _ in range(args.answers)]
            threads = [
                threading.Thread(target=ask, args=(reads, i, port, args.tokens))
                for i in range(args.answers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, r in enumerate(reads):
                n, median, longest, bunched = summary(r)
                print(
                    f"  {rep}.{i}: {n} tokens, gap median {median:.0f} ms, longest "
                    f"{longest:.0f} ms, bunched {bunched:.0%}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
