"""Shards of a tiny random model, chained, equal the whole transformers model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshshard.model.generate import LocalChain, generate
from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard, UnknownSession, _cache_keyword, load_spec

PROMPT = [5, 17, 3, 42, 8, 60, 11]
NEW = 16


def reference(model_dir: Path, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from transformers' generate(), and logits at every position after."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    tokens = out[0, len(prompt) :].tolist()
    with torch.no_grad():
        logits = model(out).logits[0]
    return tokens, logits


def chained(chain: LocalChain, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    session = "s"
    seen: list[torch.Tensor] = []
    logits = chain.step(session, torch.tensor(prompt), 0)
    tokens: list[int] = []
    for _ in range(n):
        seen.append(logits)
        token = int(torch.argmax(logits))
        tokens.append(token)
        logits = chain.step(session, torch.tensor([token]), len(prompt) + len(tokens) - 1)
    chain.drop(session)
    return tokens, seen


@pytest.mark.parametrize("cuts", [(), (1,), (3,), (5,), (1, 5), (2, 4), (1, 2, 3, 4, 5)])
def test_split_matches_whole_model(tiny_model: Path, cuts: tuple[int, ...]) -> None:
    want_tokens, want_logits = reference(tiny_model, PROMPT, NEW)
    tokens, logits = chained(LocalChain.load(tiny_model, cuts), PROMPT, NEW)
    assert tokens == want_tokens
    for step, got in enumerate(logits):
        expected = want_logits[len(PROMPT) - 1 + step]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_generate_stops_on_stop_id_and_max_tokens(tiny_llama: Path) -> None:
    chain = LocalChain.load(tiny_llama, (2,))
    free = list(generate(chain, PROMPT, 10))
    assert len(free) == 10
    stopped = list(generate(chain, PROMPT, 10, stop_ids=frozenset([free[3]])))
    assert stopped == free[: free.index(free[3])]
    assert all(not s.sessions for s in chain.shards), "sessions must be dropped after generation"


def test_chunked_prefill_equals_one_shot(tiny_llama: Path) -> None:
    shard = Shard.load(tiny_llama, 0, load_spec(tiny_llama).num_units)
    ids = torch.tensor(PROMPT)
    whole = shard.prefill("a", ids)
    shard.prefill("b", ids[:3])
    shard.prefill("b", ids[3:5])
    chunked = shard.prefill("b", ids[5:])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert shard.cache_length("b") == len(PROMPT)


def test_positions_must_continue_the_cache(tiny_llama: Path) -> None:
    shard = Shard.load(tiny_llama, 0, 3)
    shard.prefill("s", torch.tensor(PROMPT))
    with pytest.raises(ValueError, match="continue the cache"):
        shard.decode("s", torch.tensor([1]), len(PROMPT) + 1)
    with pytest.raises(UnknownSession):
        shard.decode("nobody", torch.tensor([1]), 0)


def test_drop_frees_the_session_cache(tiny_llama: Path) -> None:
    shard = Shard.load(tiny_llama, 1, 4)
    hidden = torch.randn(5, 32)
    shard.prefill("s", hidden)
    assert shard.kv_bytes() > 0
    shard.drop("s")
    assert shard.kv_bytes() == 0 and shard.sessions == []


def test_shard_holds_only_its_units(tiny_llama: Path) -> None:
    spec = load_spec(tiny_llama)
    whole = Shard.load(tiny_llama, 0, spec.num_units)
    middle = Shard.load(tiny_llama, 2, 4)
    assert middle.embed is None and middle.lm_head is None
    assert [layer.self_attn.layer_idx for layer in middle.layers] == [1, 2]
    layer_bytes = whole.unit_weight_bytes(2)
    assert middle.weight_bytes() == 2 * layer_bytes
    assert middle.weight_bytes() < whole.weight_bytes() / 2


def test_tied_head_alone_reads_the_embedding(tiny_llama: Path) -> None:
    spec = load_spec(tiny_llama)
    whole = Shard.load(tiny_llama, 0, spec.num_units)
    head = Shard.load(tiny_llama, spec.num_units - 1, spec.num_units)
    assert whole.embed is not None and head.lm_head is not None
    torch.testing.assert_close(head.lm_head.weight, whole.embed.weight)
    assert head.unit_weight_bytes(spec.num_units - 1) == whole.unit_weight_bytes(spec.num_units - 1)


def test_kv_cache_grows_past_its_first_allocation() -> None:
    cache = KVCache([7])
    chunks = [torch.randn(1, 2, n, 4) for n in (200, 100, 1)]
    for chunk in chunks:
        keys, values = cache.update(chunk, -chunk, 7)
    torch.testing.assert_close(keys, torch.cat(chunks, dim=2))
    torch.testing.assert_close(values, -torch.cat(chunks, dim=2))
    assert cache.length == 301


def test_a_reserved_cache_is_allocated_once_and_grows_only_past_its_reserve() -> None:
    cache = KVCache([7])
    cache.reserve(300)
    chunks = [torch.randn(1, 2, n, 4) for n in (200, 99, 1)]
    keys, _ = cache.update(chunks[0], -chunks[0], 7)
    storage = keys.data_ptr()
    assert cache.nbytes() == 2 * 300 * 2 * 4 * 4  # keys and values, no more than reserved
    for chunk in chunks[1:]:
        keys, values = cache.update(chunk, -chunk, 7)
    assert keys.data_ptr() == storage  # never copied to grow
    torch.testing.assert_close(values, -torch.cat(chunks, dim=2))
    more = torch.randn(1, 2, 5, 4)
    keys, _ = cache.update(more, -more, 7)  # past the reserve (a draft, say): it grows
    torch.testing.assert_close(keys, torch.cat([*chunks, more], dim=2))
    assert cache.split([7]).reserved == 300  # moved with its layers


@pytest.mark.parametrize("bad", [(-1, 2), (0, 0), (3, 2), (0, 7)])
def test_bad_unit_ranges_are_refused(tiny_llama: Path, bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="unit range"):
        Shard.load(tiny_llama, *bad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_shards_run_and_stay_close(tiny_llama: Path, dtype: str) -> None:
    full = LocalChain.load(tiny_llama, (3,))
    half = LocalChain.load(tiny_llama, (3,), dtype=dtype)
    assert half.shards[1].lm_head is not None
    assert half.shards[1].lm_head.weight.dtype == getattr(torch, dtype)
    want = full.step("s", torch.tensor(PROMPT), 0)
    got = half.step("s", torch.tensor(PROMPT), 0)
    assert got.dtype == torch.float32  # logits come back in float32 for sampling
    assert torch.corrcoef(torch.stack([want, got]))[0, 1] > 0.99


def test_batched_decode_equals_one_session_at_a_time(tiny_model: Path) -> None:
    n = load_spec(tiny_model).num_units
    first, last = Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    for i, p in enumerate(prompts):
        last.prefill(i, first.prefill(i, torch.tensor(p)))
    tokens = torch.tensor([4, 40, 77])
    batched = last.decode_batch([0, 1, 2], first.decode_batch([0, 1, 2], list(tokens[:, None])))
    for i, p in enumerate(prompts):
        alone = LocalChain([Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)])
        alone.step("s", torch.tensor(p), 0)
        want = alone.step("s", tokens[i : i + 1], len(p))
        torch.testing.assert_close(batched[i], want, atol=1e-4, rtol=0)
    assert [last.cache_length(i) for i in range(3)] == [len(p) + 1 for p in prompts]


def test_a_batch_of_rows_of_different_lengths_equals_each_pass_alone(tiny_model: Path) -> None:
    """Sessions verifying drafts of different lengths share one pass: each row gets what
    its own pass would give, and each cache grows by its own row's positions only."""
    n = load_spec(tiny_model).num_units
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    rows = [torch.tensor([4]), torch.tensor([40, 41, 42, 43]), torch.tensor([77, 78])]
    first, last = Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)
    for i, p in enumerate(prompts):
        last.prefill(i, first.prefill(i, torch.tensor(p)))
    hidden = first.decode_batch([0, 1, 2], rows)
    assert [h.shape[0] for h in hidden] == [1, 4, 2]
    batched = last.decode_batch([0, 1, 2], hidden)
    for i, p in enumerate(prompts):
        one, two = Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)
        two.prefill("s", one.prefill("s", torch.tensor(p)))
        want = two.prefill("s", one.prefill("s", rows[i]), logits=len(rows[i]))
        assert batched[i].shape == want.shape
        torch.testing.assert_close(batched[i], want, atol=1e-4, rtol=0)
    assert [last.cache_length(i) for i in range(3)] == [
        len(p) + len(r) for p, r in zip(prompts, rows, strict=True)
    ]


def test_prompts_of_new_sessions_in_one_pass_equal_each_prefill_alone(tiny_model: Path) -> None:
    """A batch may start sessions: rows of different lengths, logits of only the positions
    asked for (none for a prompt's chunk before its last)."""
    n = load_spec(tiny_model).num_units
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
    read = [1, 0, 2]
    first, last = Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)
    hidden = first.decode_batch(["a", "b", "c"], [torch.tensor(p) for p in prompts])
    batched = last.decode_batch(["a", "b", "c"], hidden, read)
    for p, got, k in zip(prompts, batched, read, strict=True):
        one, two = Shard.load(tiny_model, 0, 3), Shard.load(tiny_model, 3, n)
        want = two.prefill("s", one.prefill("s", torch.tensor(p)), logits=k)
        assert got.shape == want.shape
        if k:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [last.cache_length(s) for s in "abc"] == [len(p) for p in prompts]


def test_a_batch_drops_positions_one_layer_holds_past_the_others(tiny_llama: Path) -> None:
    """After a plan change a kept layer may hold a position the others lost; batched with a
    longer session, that stale position must not stand in for the new token's."""
    n = load_spec(tiny_llama).num_units
    clean, stale = Shard.load(tiny_llama, 0, n), Shard.load(tiny_llama, 0, n)
    long_prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]
    for shard in (clean, stale):
        shard.prefill("a", torch.tensor(PROMPT))
        shard.prefill("b", torch.tensor(long_prompt))
    # One layer of "a" holds an extra position from a feed that was lost downstream.
    extra = Shard.load(tiny_llama, 0, n)
    extra.prefill("a", torch.tensor([*PROMPT, 50]))
    keys, values = extra.export("a", 1, len(PROMPT) + 1)  # type: ignore[misc]
    stale.install("a", 1, keys, values)
    assert stale.cache_length("a") == len(PROMPT)
    tokens = list(torch.tensor([[4], [40]]))
    want = clean.decode_batch(["a", "b"], tokens)
    got = stale.decode_batch(["a", "b"], tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fused_layers_equal_transformers_layers_and_hold_no_weight_twice(
    tiny_model: Path,
) -> None:
    """Plain Llama layers run fused (q, k and v one matrix, their weights views of it); any
    other model runs transformers' layers. Either way a pass gives transformers' numbers:
    prompts (masked), single steps and packed rows of several lengths."""
    n = load_spec(tiny_model).num_units
    pairs = {
        fuse: (Shard.load(tiny_model, 0, 3, fuse=fuse), Shard.load(tiny_model, 3, n, fuse=fuse))
        for fuse in (True, False)
    }
    attn = pairs[True][0].layers[0].self_attn
    shared = attn.q_proj.weight.untyped_storage().data_ptr() == (
        attn.v_proj.weight.untyped_storage().data_ptr()
    )
    assert shared == (tiny_model.name.startswith("llama"))
    assert pairs[True][0].weight_bytes() == pairs[False][0].weight_bytes()
    rows = [torch.tensor([4]), torch.tensor([40, 41, 42]), torch.tensor([77])]
    out = {}
    for fuse, (first, last) in pairs.items():
        prompts = [
            last.prefill(i, first.prefill(i, torch.tensor(PROMPT[: 3 + i]))) for i in range(3)
        ]
        one = last.decode(0, first.decode(0, torch.tensor([9]), 3), 3)
        packed = last.decode_batch([0, 1, 2], first.decode_batch([0, 1, 2], rows))
        out[fuse] = [*prompts, one, *packed]
    for got, want in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_layer_gets_its_cache_by_the_name_its_transformers_release_takes() -> None:
    """Releases up to 5.17 take `past_key_values` and ignore `cache=` without a word (no
    cache, wrong answers: the GPU machine's release, gpu-runs.txt); later ones take `cache`."""

    class Old(torch.nn.Module):
        def forward(self, h: torch.Tensor, past_key_values: object = None, **kwargs: object):
            return h

    class New(torch.nn.Module):
        def forward(self, h: torch.Tensor, cache: object = None, **kwargs: object):
            return h

    assert _cache_keyword(Old()) == "past_key_values"
    assert _cache_keyword(New()) == "cache"
