"""The CUDA path, on a machine with a GPU (tools/device_check.sh runs these where one is lent;
elsewhere they say why they do not run). Checked against the CPU's float32 reference: float32
on CUDA gives the same logits within a tolerance; bfloat16 chooses the same next token at
nearly every step; int8 and int4 shards chain as their single process does; a CUDA first
stage scores a wave's whole head as the last stage would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.wavechain import Chain

from meshshard.chain.tensors import from_wire, to_wire
from meshshard.model.costs import unit_costs
from meshshard.model.generate import LocalChain, generate
from meshshard.model.shard import Shard, load_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: run tools/device_check.sh on a machine with one",
    ),
]
PROMPT = [3, 14, 15, 92, 65, 35, 8, 9, 7, 9]


def test_float32_on_cuda_gives_the_cpu_logits(tiny_llama: Path) -> None:
    cpu = LocalChain.load(tiny_llama, (2,))
    gpu = LocalChain.load(tiny_llama, (2,), device="cuda")
    want = cpu.step("s", torch.tensor(PROMPT), 0)
    got = gpu.step("s", torch.tensor(PROMPT), 0)
    assert got.device.type == "cpu"  # logits come back to the host for the sampler
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)


def test_bfloat16_on_cuda_picks_the_cpu_tokens(tiny_llama: Path) -> None:
    """Top-1 agreement, step by step, both fed the CPU's tokens (teacher forcing)."""
    cpu = list(generate(LocalChain.load(tiny_llama), PROMPT, 100))
    gpu = LocalChain.load(tiny_llama, (2,), "bfloat16", "cuda")
    logits = gpu.step("s", torch.tensor(PROMPT), 0)
    agree = 0
    for i, token in enumerate(cpu):
        agree += int(torch.argmax(logits)) == token
        logits = gpu.step("s", torch.tensor([token]), len(PROMPT) + i)
    assert agree >= 0.99 * len(cpu)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_cuda_shards_chain_as_one_process(tiny_llama: Path, quantize: str) -> None:
    whole = LocalChain.load(tiny_llama, (), "bfloat16", "cuda", quantize)
    split = LocalChain.load(tiny_llama, (2,), "bfloat16", "cuda", quantize)
    assert list(generate(split, PROMPT, 16)) == list(generate(whole, PROMPT, 16))
    weight = whole.shards[0].layers[0].mlp.down_proj.weight
    assert type(weight).__name__ != "Parameter"  # quantized, not silently skipped


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_planned_unit_sizes_are_what_loading_makes_on_cuda(tiny_llama: Path, quantize: str) -> None:
    n = load_spec(tiny_llama).num_units
    shard = Shard.load(tiny_llama, 0, n, "bfloat16", "cuda", quantize)
    planned = [c.weight_bytes for c in unit_costs(tiny_llama, "bfloat16", quantize)]
    assert planned == [shard.unit_weight_bytes(u) for u in range(n)]


def test_a_cuda_shard_keeps_attention_off_cudnn(tiny_llama: Path) -> None:
    """cuDNN's attention plans each new key length anew: every decode step (gpu-runs.txt)."""
    Shard.load(tiny_llama, 0, 2, "bfloat16", "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_a_cuda_stage_and_a_cpu_stage_chain(tiny_llama: Path) -> None:
    n = load_spec(tiny_llama).num_units
    gpu, cpu = Shard.load(tiny_llama, 0, 3, "bfloat16", "cuda"), Shard.load(tiny_llama, 3, n)
    hidden = gpu.prefill("s", torch.tensor(PROMPT))
    frame = to_wire(hidden)  # the one copy off the device
    assert frame.dtype == "bfloat16"
    logits = cpu.prefill("s", from_wire(frame))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("last", ["cuda", "cpu"])
async def test_a_waves_head_scored_on_cuda_gives_the_last_stages_tokens(
    tiny_llama: Path, last: str
) -> None:
    """The first stage on CUDA scores each wave's whole head in one product, its rows come
    from a CUDA or a CPU last stage: every answer the one the last stage's own head gives."""
    prompts, tokens = [PROMPT, PROMPT[3:], [5, 17, 3, 42], [40, 2, 11]], 6
    waved, plain = (Chain(tiny_llama, on, "cuda", last) for on in (True, False))
    for chain in (waved, plain):
        await chain.answer(prompts, tokens)
    assert not waved.errors and not plain.errors
    assert waved.tokens == plain.tokens
    # Every wave but the last step's went round with its head at the first stage.
    assert waved.first.first_head.wave_rows == len(prompts) * (tokens - 2)
