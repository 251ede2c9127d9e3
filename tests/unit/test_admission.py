"""Admission control, pure: a stage's KV budget, and the API's bounds on a request."""

from __future__ import annotations

from typing import Any

import pytest

from meshshard.api.openai import MAX_TOKENS, BadRequest, _parse
from meshshard.chain.admission import KVBudget
from meshshard.wire import MAX_SEED


def test_a_stage_admits_new_sessions_while_its_memory_holds_their_reservations() -> None:
    # 300 MB offered, 180 MB of weights, 15,360 bytes of KV per token (10 layers of SmolLM2).
    budget = KVBudget.of_stage(300e6, 180_000_000, 15_360)
    assert budget.tokens == 7812
    assert budget.admit("a", 2048, new=True) and budget.admit("b", 2048, new=True)
    assert budget.admit("c", 2048, new=True)
    assert not budget.admit("d", 2048, new=True)  # 4 x 2048 > 7812: refused, nothing held
    assert budget.reserved == 3 * 2048 and budget.sessions == 3
    assert budget.admit("e", 1000, new=True)  # a smaller one still fits
    # A session met again, or moved here by a plan change, is never refused.
    assert budget.admit("a", 2048, new=True) and budget.admit("moved", 4096, new=False)
    budget.release("b")
    budget.release("moved")
    assert budget.admit("d", 2048, new=True)


def test_a_stage_without_layers_keeps_no_cache_and_refuses_no_one() -> None:
    budget = KVBudget.of_stage(1e6, 10**9, 0)  # an embedding larger than the memory
    assert budget.tokens is None and all(budget.admit(f"s{i}", 10**6, True) for i in range(50))
    assert KVBudget.of_stage(1e6, 10**9, 100).tokens == 0


def test_a_new_stage_carries_the_reservations_of_the_one_it_replaces() -> None:
    old = KVBudget(10_000)
    old.admit("a", 6000, new=True)
    new = KVBudget(8000).carry(old)
    assert new.reserved == 6000 and not new.admit("b", 4000, new=True)


PROMPT = list(range(100))


@pytest.mark.parametrize(
    "body, prompt, error",
    [
        ({"seed": MAX_SEED}, PROMPT, "seed must be an integer"),  # 2**63: past the wire's range
        ({"seed": 2**64}, PROMPT, "seed must be an integer"),
        ({"seed": -1}, PROMPT, "seed must be an integer"),
        ({"max_tokens": MAX_TOKENS + 1}, PROMPT, "max_tokens"),
        ({"max_tokens": 0}, PROMPT, "max_tokens must be an integer"),
        ({"max_tokens": 1949}, PROMPT, "more than the 1948 this prompt of 100 tokens leaves"),
        ({}, list(range(2048)), "holds 2048 per answer"),
        ({}, [], "empty"),
        ({"temperature": 5}, PROMPT, "temperature"),
        ({"top_p": 0}, PROMPT, "top_p"),
        ({"stop": ["x"] * 5}, PROMPT, "stop"),
        ({"stop": "x" * 1000}, PROMPT, "stop"),
        ({"stream": "yes"}, PROMPT, "stream"),
    ],
)
def test_requests_past_what_the_mesh_carries_are_refused(
    body: dict[str, Any], prompt: list[int], error: str
) -> None:
    with pytest.raises(BadRequest, match=error):
        _parse(body, prompt, 2048)


def test_without_max_tokens_an_answer_gets_the_room_its_prompt_leaves() -> None:
    assert _parse({}, PROMPT, 2048).max_tokens == 256
    assert _parse({}, list(range(2000)), 2048).max_tokens == 48
    assert _parse({"max_tokens": 1948, "seed": MAX_SEED - 1}, PROMPT, 2048).max_tokens == 1948
