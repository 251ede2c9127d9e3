"""Shared fixtures: tiny random models of each supported layout, built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_tiny(kind: str, folder: Path, layers: int = 4) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(**TINY | {"num_hidden_layers": layers}, tie_word_embeddings=True)
    elif kind == "llama-untied":
        config = LlamaConfig(**TINY, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = Qwen2Config(**TINY, tie_word_embeddings=False)
    elif kind == "mistral":
        config = MistralConfig(**TINY, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves tiny logits that tie easily; widen them so greedy choices are stable.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "llama-untied", "qwen2", "mistral"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("llama-single"))
