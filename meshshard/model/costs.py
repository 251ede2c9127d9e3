"""What each unit costs, read from config.json and safetensors headers: no torch, no weights.

The control plane needs this at start-up, before (and without) loading any shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from meshshard.model.source import model_name
from meshshard.model.spec import ModelSpec
from meshshard.types import UnitCost

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Until a device is profiled, assume it streams weights at this rate (decode is memory-bound).
ESTIMATE_BYTES_PER_S = 10e9
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def read_spec(model_dir: Path) -> ModelSpec:
    raw = json.loads((model_dir / "config.json").read_text())
    heads = raw["num_attention_heads"]
    config = SimpleNamespace(
        model_type=raw["model_type"],
        num_hidden_layers=raw["num_hidden_layers"],
        hidden_size=raw["hidden_size"],
        vocab_size=raw["vocab_size"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        intermediate_size=raw["intermediate_size"],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        _name_or_path="",
    )
    return ModelSpec.from_config(config, name=model_name(model_dir))


def unit_costs(model_dir: Path, dtype: str, quantize: str = "none") -> list[UnitCost]:
    """Weight, KV and activation bytes of every unit, in chain order; with `quantize`, the
    decoder layers' linear weights count their quantized bytes (what `Shard.load` makes)."""
    from safetensors import safe_open

    spec = read_spec(model_dir)
    size = DTYPE_BYTES[dtype]
    weights = [0] * spec.num_units
    head = spec.num_units - 1
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                numel = 1
                shape = f.get_slice(key).get_shape()
                for dim in shape:
                    numel *= dim
                for unit in _units_of(key, spec):
                    if quantize != "none" and _LAYER.match(key) and key.endswith("_proj.weight"):
                        weights[unit] += quantized_bytes(quantize, shape[0], numel)
                    else:
                        weights[unit] += numel * size
    if spec.tied_embeddings:
        weights[head] += weights[0]
    return [
        UnitCost(
            spec.unit_name(u),
            weights[u],
            spec.kv_bytes_per_token(u, size),
            spec.out_bytes_per_token(u, size),
        )
        for u in range(spec.num_units)
    ]


def quantized_bytes(quantize: str, rows: int, numel: int) -> int:
    """Bytes of a [rows, numel / rows] linear weight quantized by torchao: int8 keeps one
    byte a weight and a float32 scale and an int8 zero point a row (measured); int4 packs two
    weights a byte with a bfloat16 scale and zero point per group of 128."""
    if quantize == "int8":
        return numel + rows * 5
    if quantize == "int4":
        return numel // 2 + (numel // 128) * 4
    raise ValueError(f"unknown quantization {quantize!r}")


def estimated_ms(costs: list[UnitCost]) -> tuple[float, ...]:
    return tuple(round(c.weight_bytes / ESTIMATE_BYTES_PER_S * 1e3 + 0.01, 4) for c in costs)


def _units_of(key: str, spec: ModelSpec) -> list[int]:
    if match := _LAYER.match(key):
        return [int(match.group(1)) + 1]
    if key.startswith("model.embed_tokens."):
        return [0]
    if key.startswith(("model.norm.", "lm_head.")):
        return [spec.num_units - 1]
    return []
