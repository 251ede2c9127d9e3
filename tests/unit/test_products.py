"""Products of a few rows: each form chosen by timing on this device, equal in value to linear."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshshard.model import products, profile
from meshshard.model.device import Device, Placement
from meshshard.model.products import (
    BLOCK,
    BLOCKED,
    FORMS,
    LINEAR,
    PARTS,
    ROWS,
    TURNED,
    Product,
    RowsLinear,
    choose,
    choose_products,
)

Timer = Callable[[Callable[[], object]], float]


def fake_timer(wins: dict[int, str], seen: list[tuple[str, int, int]] | None = None) -> Timer:
    """Times as if the form `wins[rows]` took half of linear's time and the others twice."""

    def timer(fn: Callable[[], object]) -> float:
        assert isinstance(fn, partial)
        form, x, timed = fn.args
        if seen is not None:
            seen.append((form, x.shape[0], len(timed)))
        if form == LINEAR:
            return 1.0
        return 0.5 if wins.get(x.shape[0]) == form else 2.0

    return timer


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(products, "_chosen", {})


def test_the_fastest_form_is_chosen_per_row_count_and_remembered_per_shape() -> None:
    head, other = nn.Linear(40, 30, bias=False), nn.Linear(40, 30, bias=False)
    choose_products([head], torch.device("cpu"), fake_timer({4: TURNED, 8: BLOCKED}))
    assert isinstance(head, RowsLinear)
    want = tuple({4: TURNED, 8: BLOCKED}.get(n, LINEAR) for n in ROWS)
    assert head.product.forms == want
    choose_products([other], torch.device("cpu"), fake_timer({}))  # not timed again
    assert isinstance(other, RowsLinear) and other.product.forms == want


def test_a_form_only_a_little_faster_than_linear_is_not_taken() -> None:
    p = Product(torch.randn(30, 40))
    choose([p], (LINEAR, BLOCKED), lambda fn: 0.95 if fn.args[0] == BLOCKED else 1.0)
    assert p.forms == (LINEAR,) * len(ROWS)


def test_a_shape_is_timed_over_its_matrices_up_to_the_sweep_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass reads each matrix once: timing one again and again would find it in cache. The
    sweep takes as many as SWEEP_BYTES hold, in turns form by form, and all get the choice."""
    monkeypatch.setattr(products, "SWEEP_BYTES", 3 * 30 * 40 * 4)
    many = [Product(torch.randn(30, 40)) for _ in range(5)]
    seen: list[tuple[str, int, int]] = []
    choose(many, (LINEAR, BLOCKED), fake_timer({3: BLOCKED}, seen))
    assert {n for _, _, n in seen} == {3}
    assert [f for f, rows, _ in seen if rows == ROWS[0]] == [LINEAR, BLOCKED] * products.RUNS
    assert all(p.forms == many[0].forms for p in many)
    assert many[0].forms[ROWS.index(3)] == BLOCKED


def test_a_single_threaded_form_is_timed_by_its_cpu_not_by_pauses() -> None:
    """A CPU quota pauses a process mid-product; the pause is not the form's."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert products._seconds(lambda: time.sleep(0.05)) < 0.01
        torch.set_num_threads(2)  # torch's other threads would go uncounted: the wall clock
        assert products._seconds(lambda: time.sleep(0.05)) >= 0.05
    finally:
        torch.set_num_threads(threads)


def test_layers_with_a_bias_and_other_devices_keep_torchs_linear() -> None:
    biased, elsewhere = nn.Linear(40, 30), nn.Linear(40, 30, bias=False)
    choose_products([biased], torch.device("cpu"), fake_timer({2: TURNED}))
    choose_products([elsewhere], torch.device("meta"), fake_timer({2: TURNED}))
    assert type(biased) is nn.Linear and type(elsewhere) is nn.Linear


@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (2, 3, 40), (5, 1, 40), (9, 40), (40, 40)])
def test_every_form_gives_linears_values(shape: tuple[int, ...]) -> None:
    weight = torch.randn(300, 40)  # not a multiple of BLOCK: the last block is shorter
    x = torch.randn(shape)
    want = F.linear(x, weight)
    for form in (*FORMS, PARTS):
        p = Product(weight, parts=(100, 150, 50))
        p.forms = (form,) * len(ROWS)
        torch.testing.assert_close(p(x), want)


def test_every_form_takes_rows_laid_out_as_columns() -> None:
    """What W @ xᵀ gives out is laid out as xᵀ: the next product's input, as it comes."""
    weight = torch.randn(300, 40)
    x = torch.randn(40, 3).T
    assert not x.is_contiguous()
    for form in FORMS:
        p = Product(weight)
        p.forms = (form,) * len(ROWS)
        torch.testing.assert_close(p(x), F.linear(x, weight))


@pytest.mark.parametrize("form", FORMS)
def test_a_part_cut_at_whole_blocks_gives_the_wholes_numbers_in_its_form(form: str) -> None:
    """A split head's pick scores vocabulary rows [start, end) in the form the whole head
    runs its rows in, so each logit is the whole head's; blocked, bit for bit."""
    weight = torch.randn(5 * BLOCK, 64)
    whole = Product(weight)
    whole.forms = (form,) * len(ROWS)
    for rows in (1, 2, 6, 9):
        x = torch.randn(rows, 64)
        want = whole(x)
        for start, end in ((0, 2 * BLOCK), (2 * BLOCK, 5 * BLOCK)):
            part = whole.part(start, end)
            assert part.forms == whole.forms and part.weight.data_ptr() == weight[start].data_ptr()
            got = part(x)
            if form == BLOCKED:
                assert torch.equal(got, want[:, start:end])
            else:
                torch.testing.assert_close(got, want[:, start:end])


def test_a_shards_fused_layers_share_one_choice_per_shape(tiny_llama_shard: object) -> None:
    layers = [f for f in tiny_llama_shard._fused if f is not None]  # type: ignore[attr-defined]
    assert len(layers) > 1
    for kind in ("qkv", "o", "gate_up", "down"):
        mine = [getattr(f, kind) for f in layers]
        key = next(k for k in products._chosen if k[0] == tuple(mine[0].weight.shape))
        assert all(p.forms == products._chosen[key] for p in mine)
    assert (
        PARTS in next(k for k in products._chosen if k[0] == tuple(layers[0].qkv.weight.shape))[3]
    )


@pytest.fixture
def tiny_llama_shard(tiny_llama: object) -> object:
    from meshshard.model.shard import Shard

    return Shard.load(tiny_llama, 1, 4)  # type: ignore[arg-type]  # layers only


def test_fused_layers_give_the_same_rows_whatever_the_forms(tiny_llama_shard: object) -> None:
    """A packed pass of several sessions gives the same numbers through every form."""
    shard = tiny_llama_shard
    layers = [f for f in shard._fused if f is not None]  # type: ignore[attr-defined]
    hidden = layers[0].qkv.weight.shape[1]
    rows = [
        torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)) for n in (1, 3, 2, 1)
    ]
    out = {}
    for form in (LINEAR, PARTS, BLOCKED):
        for f in layers:
            for p in (f.qkv, f.gate_up):
                p.forms = (form,) * len(ROWS)
            for p in (f.o, f.down):
                p.forms = (BLOCKED if form == BLOCKED else LINEAR,) * len(ROWS)
        sessions = [f"{form}-{i}" for i in range(len(rows))]
        out[form] = shard.decode_batch(sessions, rows)  # type: ignore[attr-defined]
    for form in (PARTS, BLOCKED):
        for got, want in zip(out[form], out[LINEAR], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_forms_chosen_in_one_process_are_taken_by_another_and_not_timed_again() -> None:
    p = Product(torch.randn(30, 40))
    choose([p], FORMS, fake_timer({2: TURNED, 6: BLOCKED}))
    kept = json.loads(json.dumps(products.chosen()))  # as the profile's folder keeps them
    products._chosen.clear()  # another process
    assert products.adopt(kept)
    again = Product(torch.randn(30, 40))
    choose([again], FORMS, fake_timer({}))  # it would keep linear everywhere: not asked
    assert again.forms == p.forms and TURNED in again.forms and BLOCKED in again.forms


@pytest.mark.parametrize(
    "change",
    [
        {"rows": [2, 4]},  # timed for other row counts
        {"chosen": ["nonsense"] * len(ROWS)},
        {"chosen": [TURNED] * len(ROWS), "forms": [LINEAR, BLOCKED]},  # not among those timed
        {"dtype": "no_such_dtype"},
        {"threads": "1"},
        {"shape": "30x40"},
    ],
)
def test_forms_of_another_kind_are_refused_all_or_none(change: dict[str, object]) -> None:
    choose([Product(torch.randn(30, 40)), Product(torch.randn(8, 40))], FORMS, fake_timer({}))
    kept = products.chosen()
    products._chosen.clear()
    assert not products.adopt([kept[0], kept[1] | change])
    assert products._chosen == {}
    assert not products.adopt({"not": "a list"}) and not products.adopt([["x"]])


def test_a_kept_profile_comes_with_the_forms_it_was_measured_with(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[object] = []
    quick = profile.quick_profile
    monkeypatch.setattr(profile, "quick_profile", lambda *a: measured.append(a) or quick(*a))
    cpu = Placement(Device("cpu"), "float32")
    first = profile.cached_quick_profile(tiny_llama, cpu, tmp_path)
    chosen = dict(products._chosen)
    assert chosen and len(measured) == 1  # the profile's passes chose the forms
    products._chosen.clear()  # a later process reads the profile: its forms with it
    assert profile.cached_quick_profile(tiny_llama, cpu, tmp_path) == first
    assert products._chosen == chosen and len(measured) == 1
    # A profile kept without them (or with forms of another kind) is measured again.
    (forms,) = tmp_path.glob("*.forms")
    for text in (None, "[{}]"):
        forms.unlink()
        if text is not None:
            forms.write_text(text)
        products._chosen.clear()
        profile.cached_quick_profile(tiny_llama, cpu, tmp_path)
        assert forms.exists() and products._chosen
    assert len(measured) == 3
