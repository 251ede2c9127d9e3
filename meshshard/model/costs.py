"""What each unit costs, read from config.json and safetensors headers: no torch, no weights.

The control plane needs this at start-up, before (and without) loading any shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from meshshard.errors import MeshShardError
from meshshard.model.source import model_name
from meshshard.model.spec import ModelSpec
from meshshard.types import UnitCost

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Until a device is profiled, assume it streams weights at this rate (decode is memory-bound).
ESTIMATE_BYTES_PER_S = 10e9
# Weights that share an int4 scale: torch's int4 kernel takes groups of 32 to 256.
INT4_GROUPS = (128, 64, 32)
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
    group = int4_group(spec.linear_inputs) if quantize == "int4" else 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                numel = 1
                shape = f.get_slice(key).get_shape()
                for dim in shape:
                    numel *= dim
                for unit in _units_of(key, spec):
                    if quantize != "none" and _LAYER.match(key) and key.endswith("_proj.weight"):
                        weights[unit] += quantized_bytes(quantize, shape[0], numel, group)
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


def int4_group(widths: tuple[int, ...]) -> int:
    """The most weights a scale can cover in int4, dividing every linear layer's input width
    (SmolLM2's 576 takes 64), or a one-line error."""
    for group in INT4_GROUPS:
        if all(width % group == 0 for width in widths):
            return group
    raise MeshShardError(
        f"--quantize int4 needs layer widths that are multiples of 32, not {sorted(set(widths))}"
    )


def quantized_bytes(quantize: str, rows: int, numel: int, group: int = 0) -> int:
    """Bytes of a [rows, numel / rows] linear weight quantized by torchao: int8 keeps one
    byte a weight and a float32 scale and an int8 zero point a row (measured); int4, in
    torch's tinygemm layout, pads the inputs to a multiple of 1024 and the outputs to one of 8,
    then packs two weights a byte with a bfloat16 scale and zero point per `group` inputs."""
    if quantize == "int8":
        return numel + rows * 5
    if quantize == "int4":
        cols = -(-(numel // rows) // 1024) * 1024
        rows = -(-rows // 8) * 8
        return rows * cols // 2 + rows * (cols // group) * 4
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
