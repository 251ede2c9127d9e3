"""How steady a quick profile's batch timings are: take the peer's own quick profile a few
times here and print, for each, the decoder layers' one-row time and their passes of each
batch size over one row's, and the head's; then the same columns for profiles kept in
folders (a testbed's `/run/meshshard-testbed/<tb>/profiles-*`).

    python tools/profile_ratios.py --repeats 7 [--kept DIR ...]

Run it in the CPU share it should see (a cgroup, `OMP_NUM_THREADS=1`): the numbers are this
process's. docs/experiments/profile-ratios.txt holds a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def row(name: str, units: Sequence[Mapping[str, Any]]) -> str:
    """One profile's line: the decoder layers' median one-row ms and ratios, the head's."""
    layers, head = units[1:-1], units[-1]
    one = statistics.median(u["decode_ms"] for u in layers)
    sizes = range(len(layers[0]["batch_ms"]))
    body = " ".join(
        f"{statistics.median(u['batch_ms'][k] for u in layers) / one:.2f}" for k in sizes
    )
    ratios = " ".join(f"{ms / head['decode_ms']:.2f}" for ms in head["batch_ms"])
    return f"{name:<32} one {one:.3f} {body} | head {head['decode_ms']:.2f} {ratios}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Quick profiles to take here.")
    parser.add_argument("--kept", nargs="*", default=[], help="Folders of kept profiles.")
    args = parser.parse_args()
    if args.repeats:
        import torch

        from meshshard.config import Config
        from meshshard.model.device import place
        from meshshard.model.profile import quick_profile
        from meshshard.model.source import resolve_model

        model_dir = resolve_model("default", Config().cache_dir)
        placement = place("cpu", None, "none")
        print(f"# quick profiles here, {torch.get_num_threads()} torch thread(s)")
        for i in range(args.repeats):
            start = time.monotonic()
            got = quick_profile(model_dir, placement)
            took = time.monotonic() - start
            print(row(f"q{i + 1} ({took:.0f} s)", [asdict(u) for u in got.units]), flush=True)
    for folder in map(Path, args.kept):
        for path in sorted(folder.glob("*.json")):
            units = json.loads(path.read_text())["units"]
            version = path.stem.rsplit("-", 1)[-1]  # the profile's version, as v15
            print(row(f"{folder.name} {version}", units))


if __name__ == "__main__":
    main()
