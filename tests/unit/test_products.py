"""The head's product form: chosen by timing both on this device, equal in value either way."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshshard.model import products
from meshshard.model.products import ROWS, RowsLinear, choose_products


def fake_timer(transposed_wins: set[int]) -> Callable[[Callable[[], object]], float]:
    """Times as if W @ xᵀ took half of linear's time for these row counts, twice otherwise."""

    def timer(fn: Callable[[], object]) -> float:
        assert isinstance(fn, partial)
        if fn.func is F.linear:
            return 1.0
        rows = fn.args[1].shape[1]
        return 0.5 if rows in transposed_wins else 2.0

    return timer


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(products, "_chosen", {})


def test_the_faster_form_is_chosen_per_row_count_and_remembered_per_shape() -> None:
    head, other = nn.Linear(40, 30, bias=False), nn.Linear(40, 30, bias=False)
    choose_products([head], torch.device("cpu"), fake_timer({4, 8}))
    assert isinstance(head, RowsLinear)
    assert head.transposed == tuple(n in (4, 8) for n in ROWS)
    choose_products([other], torch.device("cpu"), fake_timer(set()))  # not timed again
    assert isinstance(other, RowsLinear) and other.transposed == head.transposed


def test_layers_with_a_bias_and_other_devices_keep_torchs_linear() -> None:
    biased, elsewhere = nn.Linear(40, 30), nn.Linear(40, 30, bias=False)
    choose_products([biased], torch.device("cpu"), fake_timer({2}))
    choose_products([elsewhere], torch.device("meta"), fake_timer({2}))
    assert type(biased) is nn.Linear and type(elsewhere) is nn.Linear


@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (2, 3, 40), (5, 1, 40), (40, 40)])
def test_both_forms_give_linears_values(shape: tuple[int, ...]) -> None:
    plain = nn.Linear(40, 30, bias=False)
    x = torch.randn(shape)
    want = plain(x)
    for wins in (set(ROWS), set()):
        layer = nn.Linear(40, 30, bias=False)
        layer.weight = plain.weight
        products._chosen.clear()
        choose_products([layer], torch.device("cpu"), fake_timer(wins))
        torch.testing.assert_close(layer(x), want)
