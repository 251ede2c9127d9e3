"""Write the paper-scale planner instances in peers/ (Llama2-7B, 13B and 70B on the paper's
15 devices), DERIVED from the models' shapes and the devices' published specifications: the
paper published no per-layer profile for these settings.

    python tools/make_instances.py        # rewrites peers/paper-llama2-*.json

The derivation, unit by unit, for one decode step (one token, float32 weights):

- Weights: parameters x 4 bytes, from each model's shape (hidden h, MLP width i, key/value
  width kv, vocabulary v = 32000): a decoder layer holds 2h^2 + 2h*kv (attention) + 3h*i
  (MLP) + 2h (norms) parameters; the embedding and the head v*h each.
- Time: a decode step reads every weight of a layer once and does 2 FLOPs per weight, so a
  unit takes max(bytes read / (memory bandwidth x EFFICIENCY), FLOPs / (FP32 peak x
  EFFICIENCY)). For every unit here the memory term is the larger (decode is memory-bound).
  The embedding reads one row (h x 4 bytes). No per-kernel launch cost is added: the specs
  do not give one.
- Activations: one token's hidden state, h x 4 bytes; the head returns a token id (4 bytes).
- Devices (spec sheets): Jetson AGX Orin 32GB: 204.8 GB/s LPDDR5, 1792 CUDA cores at
  930 MHz (3.33 TFLOPS FP32); Jetson Orin NX 16GB: 102.4 GB/s, 1024 cores at 918 MHz
  (1.88 TFLOPS); RTX 3090: 936 GB/s GDDR6X, 35.6 TFLOPS FP32. Usable memory as the paper
  states it (29, 14 and 22 GB, read as 1e9 bytes).
- Testbed (the paper's): 12 AGX Orin, 2 Orin NX (orin-nx-0 is the source), 1 RTX 3090 (the
  cloud); links 950 Mbit/s with 2.1 ms a message.

EFFICIENCY is an assumption, not a measurement: 0.7 of peak is what memory-bound matrix-vector
kernels commonly reach. For 7B it gives 5.65 ms per layer on an AGX Orin, where the public
reproduction's measured profile (../shared/paper-profile-llama2-7b.json) has 5.2-5.5 ms; its
Orin NX (5.6-6.4 ms) and RTX 3090 (0.77-0.83 ms) figures would need more than those devices'
peak bandwidth for float32 weights (135 and 1012 GB/s), so they cannot be float32 timings
and are not used here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent.parent / "peers"

EFFICIENCY = 0.7  # of peak bandwidth and FLOPs that a decode step reaches (assumed)
BYTES = 4  # float32
VOCAB = 32_000
MODELS = {  # layers, hidden, MLP width, key/value width (70B: 8 KV heads of 128)
    "7b": (32, 4096, 11008, 4096),
    "13b": (40, 5120, 13824, 5120),
    "70b": (80, 8192, 28672, 1024),
}
KINDS = {  # memory GB/s, FP32 TFLOPS, usable bytes, count
    "orin-nx": (102.4, 1.88, 14e9, 2),
    "orin-agx": (204.8, 3.33, 29e9, 12),
    "rtx3090": (936.0, 35.6, 22e9, 1),
}
SOURCE, CLOUD = "orin-nx-0", "rtx3090-0"
LINK = {"mbps": 950.0, "ms": 2.1}


def layer_params(h: int, i: int, kv: int) -> int:
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def unit_ms(read_bytes: float, flops: float, kind: str) -> float:
    gbps, tflops, _, _ = KINDS[kind]
    memory = read_bytes / (gbps * 1e9 * EFFICIENCY)
    compute = flops / (tflops * 1e12 * EFFICIENCY)
    return round(1e3 * max(memory, compute), 5)


def instance(model: str, server_mbps: float | None = None) -> dict[str, Any]:
    layers, h, i, kv = MODELS[model]
    per_layer = layer_params(h, i, kv)
    table = VOCAB * h
    units = [{"name": "embed", "mem": table * BYTES, "out_bytes": h * BYTES}]
    units += [
        {"name": f"L{n}", "mem": per_layer * BYTES, "out_bytes": h * BYTES} for n in range(layers)
    ]
    units.append({"name": "head", "mem": (table + h) * BYTES, "out_bytes": 4})
    devices = []
    for kind, (_, _, usable, count) in KINDS.items():
        ms = [
            unit_ms(h * BYTES, 0, kind),
            *[unit_ms(per_layer * BYTES, 2 * per_layer, kind)] * layers,
            unit_ms((table + h) * BYTES, 2 * table, kind),
        ]
        for k in range(count):
            name = f"{kind}-{k}"
            device: dict[str, Any] = {"name": name, "kind": kind, "mem": usable, "ms": ms}
            devices.append(device | ({"role": "cloud"} if name == CLOUD else {}))
    pairs = []
    if server_mbps is not None:
        pairs.append({"a": SOURCE, "b": CLOUD, "mbps": server_mbps, "ms": LINK["ms"]})
    return {
        "about": f"Llama2-{model.upper()} float32 on the EdgeShard paper's 15 devices: DERIVED "
        "from model shapes and device specs by tools/make_instances.py (see its docstring), "
        "not measured.",
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
