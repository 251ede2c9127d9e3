"""bench_chain's prefill gap alone, several times: its 2-peer loopback mesh (600 MB each,
`--context 4096`; `--peers 3`: its 3-peer mesh, 360 MB each) brought up `--bringups` times,
and on each the gap measured `--times` times (2 answers decoding while a 2,000-token prompt
is prefilled: the longest gap between their tokens against their usual gap). Prints the
plan and each measurement.

    python tools/bench_gap.py --bringups 3 --times 2 [--peers 3]

docs/experiments/first-prefill-gap.txt holds runs of it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_chain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bringups", type=int, default=1)
    parser.add_argument("--times", type=int, default=2, help="Gaps measured per bring-up.")
    parser.add_argument("--peers", type=int, choices=(2, 3), default=2)
    args = parser.parse_args()
    for bringup in range(1, args.bringups + 1):
        with (
            tempfile.TemporaryDirectory() as logs,
            bench_chain.gap_mesh(Path(logs), args.peers) as procs,
        ):
            print(f"bring-up {bringup}: {bench_chain.plan_words(procs[0])}")
            for i in range(1, args.times + 1):
                g = bench_chain.prefill_gap(procs[0].url)
                print(
                    f"  {i}: prefill {g['prefill_s']:.1f} s, longest gap "
                    f"{g['longest_gap_ms']:.0f} ms, usual {g['usual_gap_ms']:.0f} ms, "
                    f"ratio {g['gap_ratio']:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
