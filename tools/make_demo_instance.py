"""Write peers/local-demo.json: the 3-peer loopback demo mesh as a planner instance.

    meshshard profile --json > profile.json
    python tools/make_demo_instance.py profile.json

Three peers on one machine share its profile; each offers 256 MB, so no single peer holds
SmolLM2-135M (540 MB in float32) and the plan must split it. Loopback links are measured
at about 0.15 ms per message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshshard.planner.build import build_instance, units_from_profile  # noqa: E402
from meshshard.planner.instance import Link  # noqa: E402

PEERS = ("peer-a", "peer-b", "peer-c")
MEMORY = 256e6
CONTEXT = 2048


def main() -> None:
    profile = json.loads(Path(sys.argv[1]).read_text())
    ms = [u["decode_ms"] for u in profile["units"]]
    inst = build_instance(
        units_from_profile(profile),
        [(name, MEMORY, ms) for name in PEERS],
        source=PEERS[0],
        context_tokens=CONTEXT,
        default_link=Link(mbps=10_000, ms=0.15),
    )
    out = ROOT / "peers" / "local-demo.json"
    out.write_text(json.dumps(inst.to_json(), indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
