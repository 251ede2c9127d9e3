"""`meshshard model info`: what the model is, without loading its weights."""

from __future__ import annotations

from pathlib import Path

from meshshard.config import Config
from meshshard.model.costs import unit_costs
from meshshard.model.shard import load_spec
from meshshard.model.source import resolve_model


def model_info(config: Config) -> dict[str, object]:
    model_dir = resolve_model(config.model, config.cache_dir)
    spec = load_spec(model_dir)
    placement = config.placement()
    units = unit_costs(model_dir, placement.dtype, placement.quantize)
    return {
        "model": spec.name,
        "type": spec.model_type,
        "layers": spec.num_layers,
        "units": spec.num_units,
        "unit_names": f"embed, L0..L{spec.num_layers - 1}, head",
        "hidden": spec.hidden_size,
        "heads": f"{spec.num_heads} ({spec.num_kv_heads} KV, head dim {spec.head_dim})",
        "vocab": spec.vocab_size,
        "parameters": count_parameters(model_dir),
        "tied": spec.tied_embeddings,
        "device": str(placement.device),
        "dtype": placement.dtype,
        "quantize": placement.quantize,
        # Bytes of the weights as they would be loaded (dtype, quantization), in all and by
        # unit (a tied head counts the embedding it reads).
        "weight_bytes": sum(u.weight_bytes for u in units),
        "unit_weight_bytes": {u.name: u.weight_bytes for u in units},
        "folder": str(model_dir),
        "cache": str(config.cache_dir),
    }


def count_parameters(model_dir: Path) -> int:
    """Sum of tensor sizes from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total
