from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshshard.errors import MeshShardError
from meshshard.model.sampling import Sampler, SamplingParams
from meshshard.model.shard import load_spec
from meshshard.model.source import resolve_model


def test_units_are_embed_layers_head(tiny_llama: Path) -> None:
    spec = load_spec(tiny_llama)
    assert spec.num_units == 6
    assert spec.unit_names == ["embed", "L0", "L1", "L2", "L3", "head"]
    assert [spec.layer_of(u) for u in range(6)] == [None, 0, 1, 2, 3, None]
    assert spec.kv_bytes_per_token(1, 4) == 2 * 2 * 8 * 4
    assert spec.kv_bytes_per_token(0, 4) == 0
    assert spec.out_bytes_per_token(5, 4) == 4
    assert spec.out_bytes_per_token(2, 2) == 64


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert Sampler(SamplingParams())(logits) == 1


def test_seeded_sampling_is_reproducible_and_varies() -> None:
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    first = [a(logits, step) for step in range(20)]
    assert first == [b(logits, step) for step in range(20)]
    assert len(set(first)) > 5


def test_top_p_keeps_only_the_head_of_the_distribution() -> None:
    logits = torch.tensor([5.0, 4.0, -5.0, -5.0, -5.0])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {sampler(logits, step) for step in range(50)} == {0}


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MeshShardError, match="model not found"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeshShardError, match=r"no config\.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(MeshShardError, match="unsupported model type 'bert'"):
        resolve_model(str(tmp_path), tmp_path)


def test_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(MeshShardError, match="safetensors"):
        resolve_model(str(tmp_path), tmp_path)
