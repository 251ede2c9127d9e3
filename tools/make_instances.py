"""Write the planner instances in peers/ from the EdgeShard paper's testbed figures.

Testbed: 12 Jetson AGX Orin (29 GB usable), 2 Jetson Orin NX (14 GB), 1 RTX 3090 server
(22 GB); links 950 Mbit/s with 2.1 ms per message; the source is orin-nx-0. Llama2-7B in
fp32: 0.754 GB per decoder layer, 0.488 GB for the embedding and for the head, 65,536-byte
activations (4096 floats x 4 tokens); per-layer decode 5.2-5.5 ms (AGX), 5.6-6.4 ms (NX),
0.76-0.83 ms (3090). 13B and 70B scale sizes and times by parameters per layer (decode is
memory-bound) and activations by hidden size. Spreads within the ranges are deterministic.

    python tools/make_instances.py        # rewrites peers/paper-*.json
"""

from __future__ import annotations

import json
from pathlib import Path

PEERS = Path(__file__).resolve().parent.parent / "peers"

# Parameters per decoder layer and hidden size, from the models' shapes.
MODELS = {
    "7b": {"layers": 32, "hidden": 4096, "layer_params": 202.4e6},
    "13b": {"layers": 40, "hidden": 5120, "layer_params": 317.2e6},
    "70b": {"layers": 80, "hidden": 8192, "layer_params": 855.6e6},
}
LAYER_GB_7B, EMBED_GB_7B = 0.754, 0.488
DEVICES = [  # (name prefix, count, usable memory, per-layer ms range for 7B)
    ("orin-nx", 2, 14e9, (5.6, 6.4)),
    ("orin-agx", 12, 29e9, (5.2, 5.5)),
    ("rtx3090", 1, 22e9, (0.76, 0.83)),
]
SOURCE = "orin-nx-0"
LINK = {"mbps": 950.0, "ms": 2.1}


def spread(lo: float, hi: float, i: int, salt: int) -> float:
    return round(lo + (hi - lo) * ((i * salt) % 11) / 10, 4)


def instance(model: str, server_mbps: float | None = None) -> dict[str, object]:
    shape = MODELS[model]
    scale = shape["layer_params"] / MODELS["7b"]["layer_params"]
    embed_scale = shape["hidden"] / 4096
    layers = int(shape["layers"])
    out = 4 * shape["hidden"] * 4
    units = [{"name": "embed", "mem": EMBED_GB_7B * embed_scale * 1e9, "out_bytes": out}]
    units += [
        {"name": f"L{i}", "mem": round(LAYER_GB_7B * scale * 1e9), "out_bytes": out}
        for i in range(layers)
    ]
    units.append({"name": "head", "mem": EMBED_GB_7B * embed_scale * 1e9, "out_bytes": 4})
    devices = []
    for prefix, count, mem, (lo, hi) in DEVICES:
        for k in range(count):
            per_layer = [round(spread(lo, hi, i, 7) * scale, 4) for i in range(layers)]
            mean = sum(per_layer) / layers
            # The embedding is a lookup; the head reads a matrix 0.65x a layer's size.
            ms = [round(0.02 * mean, 4), *per_layer, round(0.65 * mean * embed_scale / scale, 4)]
            devices.append({"name": f"{prefix}-{k}", "mem": mem, "ms": ms})
    pairs = []
    if server_mbps is not None:
        pairs.append({"a": SOURCE, "b": "rtx3090-0", "mbps": server_mbps, "ms": LINK["ms"]})
    return {
        "units": units,
        "devices": devices,
        "links": {"default": LINK, "pairs": pairs},
        "source": SOURCE,
        "return_bytes": 4,
    }


def main() -> None:
    files = {
        "paper-llama2-7b.json": instance("7b"),
        "paper-llama2-7b-slow-server.json": instance("7b", server_mbps=10.0),
        "paper-llama2-13b.json": instance("13b"),
        "paper-llama2-70b.json": instance("70b"),
    }
    for name, data in files.items():
        (PEERS / name).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote peers/{name}")


if __name__ == "__main__":
    main()
