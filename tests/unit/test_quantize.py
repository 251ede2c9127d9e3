"""Quantized and mixed-dtype shards on the CPU: a quantized chain gives the quantized single
process's tokens, planned sizes are what loading makes, and a chain whose shards run in
different dtypes passes its activations and caches between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from meshshard.chain.tensors import from_wire, to_wire
from meshshard.errors import MeshShardError
from meshshard.model.costs import int4_group, quantized_bytes, unit_costs
from meshshard.model.generate import LocalChain, generate
from meshshard.model.shard import Shard, load_spec

PROMPT = [3, 14, 15, 92, 65, 35]


def test_a_quantized_chain_gives_the_quantized_single_process_tokens(tiny_llama: Path) -> None:
    whole = LocalChain.load(tiny_llama, quantize="int8")
    for cuts in [(2,), (1, 3), (1, 2, 4)]:
        split = LocalChain.load(tiny_llama, cuts, quantize="int8")
        assert list(generate(split, PROMPT, 16)) == list(generate(whole, PROMPT, 16)), cuts
    plain = list(generate(LocalChain.load(tiny_llama), PROMPT, 16))
    assert plain  # and the quantized model is a different model (not a silent no-op):
    layer = whole.shards[0].layers[0].self_attn.q_proj.weight
    assert type(layer).__name__ != "Parameter"


def test_planned_unit_sizes_are_what_loading_makes(tiny_llama: Path) -> None:
    n = load_spec(tiny_llama).num_units
    for quantize in ("none", "int8"):
        costs = unit_costs(tiny_llama, "float32", quantize)
        shard = Shard.load(tiny_llama, 0, n, "float32", "cpu", quantize)
        assert [c.weight_bytes for c in costs] == [shard.unit_weight_bytes(u) for u in range(n)]
    plain, int8 = unit_costs(tiny_llama, "float32"), unit_costs(tiny_llama, "float32", "int8")
    # Layers shrink to about a quarter (a byte a weight, a scale a row); embed and head stay.
    assert all(
        q.weight_bytes < 0.35 * p.weight_bytes for p, q in zip(plain[1:-1], int8[1:-1], strict=True)
    )
    assert (plain[0], plain[-1]) == (int8[0], int8[-1])


@pytest.mark.parametrize("first, second", [("bfloat16", "float32"), ("float32", "float16")])
def test_shards_of_different_dtypes_pass_activations_and_caches(
    tiny_llama: Path, first: str, second: str
) -> None:
    n = load_spec(tiny_llama).num_units
    a, b = Shard.load(tiny_llama, 0, 3, first), Shard.load(tiny_llama, 3, n, second)
    ids = torch.tensor(PROMPT)
    hidden = a.prefill("s", ids)
    wire = to_wire(hidden)  # the frame says its dtype; the receiver converts
    assert wire.dtype == first
    logits = b.prefill("s", from_wire(wire))
    direct = b.prefill("t", hidden)  # the same without the wire: bit for bit
    assert torch.equal(logits, direct) and torch.isfinite(logits).all()
    # A KV handoff from a peer of another dtype is converted, not refused.
    c = Shard.load(tiny_llama, 3, n, first)
    layer = b.layer_ids[0]
    keys, values = b.export("s", layer, len(PROMPT))  # type: ignore[misc]
    c.install("s", layer, from_wire(to_wire(keys)), from_wire(to_wire(values)))
    held = c._sessions["s"].layer(layer)[0]
    assert held.dtype == c.dtype and held.shape == keys.shape


def test_a_quantized_shard_holds_one_layer_at_full_precision_at_most(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshshard.model import shard as shard_module

    events: list[str] = []
    load, quantize = shard_module._load_weights, shard_module.quantize_layers

    def loading(*args: Any) -> None:
        events.append("load")
        load(*args)

    def quantizing(layers: list[torch.nn.Module], *args: Any) -> None:
        events.append(f"quantize {len(layers)}")
        quantize(layers, *args)

    monkeypatch.setattr(shard_module, "_load_weights", loading)
    monkeypatch.setattr(shard_module, "quantize_layers", quantizing)
    shard = Shard.load(tiny_llama, 0, load_spec(tiny_llama).num_units, "float32", "cpu", "int8")
    # The ends first, then each layer read and quantized before the next one is read.
    assert events == ["load"] + ["load", "quantize 1"] * len(shard.layers)
    with pytest.raises(MeshShardError, match="int4 runs on CUDA only"):
        Shard.load(tiny_llama, 0, 2, "float32", "cpu", "int4")


def test_int4_groups_divide_every_layer_width_and_sizes_count_the_kernels_padding() -> None:
    assert int4_group((4096, 4096, 11008)) == 128  # Llama-2-7B
    assert int4_group((576, 576, 1536)) == 64  # SmolLM2-135M: 576 is 4.5 groups of 128
    assert int4_group((32, 32, 64)) == 32
    with pytest.raises(MeshShardError, match="multiples of 32, not \\[48, 96\\]"):
        int4_group((48, 48, 96))
    # SmolLM2's down projection: 576 rows of 1536 inputs, padded to 2048, 32 groups of 64;
    # half a byte a weight, then a bfloat16 scale and zero a row a group.
    assert quantized_bytes("int4", 576, 576 * 1536, 64) == 576 * 2048 // 2 + 576 * 32 * 4
