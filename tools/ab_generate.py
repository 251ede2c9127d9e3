"""The single process's greedy decode rate: this working tree against another commit, in turns.

Each turn runs `meshshard generate --json` (one thread, as the demo's peers) once for each
prompt from both trees, the order swapped every turn, each in a fresh process; it prints
every turn's decode rate (tokens/s after the first token) and the ratio, then the median
ratio, and fails if the two trees' greedy tokens differ for any prompt.

    python tools/ab_generate.py --before 452fce4 [--turns 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a transistor works.",
)


def generate(tree: Path, prompt: str, tokens: int) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "meshshard", "generate", prompt, "--chat", "--json"]
    out = subprocess.run(
        [*command, "--max-tokens", str(tokens)],
        cwd=tree, env=env, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ab-generate-"))
    before = folder / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(before), args.before],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    trees = {"before": before, "now": ROOT}
    ratios, differ = [], set()
    try:
        print(f"single process, 1 thread, {args.tokens} tokens, decode tokens/s: "
              f"before ({args.before}) | now (working tree): now/before")  # fmt: skip
        for turn in range(args.turns):
            order = list(trees) if turn % 2 == 0 else list(reversed(trees))
            rates: dict[str, list[float]] = {name: [] for name in trees}
            for prompt in PROMPTS:
                got = {name: generate(trees[name], prompt, args.tokens) for name in order}
                for name, answer in got.items():
                    rates[name].append(float(answer["tokens_per_s"]))  # type: ignore[arg-type]
                if got["before"]["tokens"] != got["now"]["tokens"]:
                    differ.add(prompt)
            b, n = statistics.fmean(rates["before"]), statistics.fmean(rates["now"])
            ratios.append(n / b)
            cells = "  ".join(f"{x:5.1f} | {y:5.1f}" for x, y in zip(*rates.values(), strict=True))
            print(f"turn {turn + 1} ({order[0]} first): {cells}  mean {b:5.1f} | "
                  f"{n:5.1f}: {n / b:.2f}")  # fmt: skip
        print(f"median now/before over {args.turns} turns: {statistics.median(ratios):.2f}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
        shutil.rmtree(folder, ignore_errors=True)
    if differ:
        sys.exit(f"the greedy tokens differ for: {'; '.join(sorted(differ))}")
    print("the same greedy tokens for every prompt")


if __name__ == "__main__":
    main()
