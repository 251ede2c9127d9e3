"""KV handoff, pure and on shards: which units move, and caches that move or stay keep the
answer exactly the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshshard.chain.handoff import LeftBehind, Move, moves
from meshshard.chain.lanes import fitted
from meshshard.chain.tensors import from_wire, to_wire
from meshshard.model.generate import LocalChain
from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard, load_spec
from meshshard.types import Epoch, NodeId, PlanRecord, PlanStage
from meshshard.wire import KVFrame

PROMPT = [5, 17, 3, 42, 8, 60, 11]


def plan(*stages: tuple[str, int, int]) -> PlanRecord:
    return PlanRecord(
        Epoch(1, "a"),
        "m",
        "latency",
        tuple(PlanStage(NodeId(d), s, e) for d, s, e in stages),
        1.0,
        1.0,
    )


@pytest.mark.parametrize(
    "old, new, want",
    [
        # Nothing moves: the same stages under a new epoch.
        ([("a", 0, 3), ("b", 3, 6)], [("a", 0, 3), ("b", 3, 6)], []),
        # A boundary shifts: units 2 go from a to b.
        ([("a", 0, 3), ("b", 3, 6)], [("a", 0, 2), ("b", 2, 6)], [Move("a", "b", 2, 3)]),
        # b leaves: its layer units go to a and c; the head unit (5) has no cache.
        (
            [("a", 0, 2), ("b", 2, 5), ("c", 5, 6)],
            [("a", 0, 3), ("c", 3, 6)],
            [Move("b", "a", 2, 3), Move("b", "c", 3, 5)],
        ),
        # A newcomer takes the middle; the embed unit (0) has no cache either.
        ([("a", 0, 6)], [("z", 0, 2), ("a", 2, 6)], [Move("a", "z", 1, 2)]),
    ],
)
def test_moves_are_maximal_runs_of_cached_units(
    old: list[tuple[str, int, int]], new: list[tuple[str, int, int]], want: list[Move]
) -> None:
    assert moves(plan(*old), plan(*new), 6) == want


def test_left_behind_caches_expire_and_merge() -> None:
    now = [0.0]
    left = LeftBehind(10.0, lambda: now[0])
    a, b = KVCache([1, 2]), KVCache([3])
    x = torch.randn(1, 2, 4, 8)
    a.update(x, x, 1)
    a.update(x, x, 2)
    b.update(x, x, 3)
    left.add({"s": a})
    now[0] = 5.0
    left.add({"s": b, "t": KVCache([1])})
    merged = left.get("s")
    assert merged is not None and sorted(merged.layers) == [1, 2, 3] and merged.length == 4
    now[0] = 14.0
    assert left.expire() == []
    now[0] = 15.0
    assert sorted(left.expire()) == ["s", "t"] and len(left) == 0


def run(chain: LocalChain, session: str, prompt: list[int], n: int, pos: int = 0) -> list[int]:
    """Greedy tokens, continuing a session whose caches hold `pos` positions of `prompt`."""
    tokens: list[int] = []
    logits = chain.step(session, torch.tensor(prompt[pos:]), pos)
    for i in range(n):
        tokens.append(int(torch.argmax(logits)))
        if i + 1 < n:  # the newest token is fed by whoever continues
            logits = chain.step(session, torch.tensor(tokens[-1:]), len(prompt) + i)
    return tokens


def test_caches_moved_between_shards_continue_the_answer_exactly(tiny_llama: Path) -> None:
    n = load_spec(tiny_llama).num_units  # 6: embed, 4 layers, head
    want = run(LocalChain.load(tiny_llama), "s", PROMPT, 12)
    old = LocalChain.load(tiny_llama, (3,))  # [0,3) [3,6)
    first = run(old, "s", PROMPT, 4)
    assert first == want[:4]
    history = PROMPT + first
    # A new plan: [0,2) [2,6). The first shard keeps layer 0 (unit 1) and hands layer 1
    # (unit 2) to the second, which keeps layers 2 and 3 (units 3 and 4).
    new = [Shard.load(tiny_llama, 0, 2), Shard.load(tiny_llama, 2, n)]
    rest_a = new[0].adopt(old.shards[0].take_caches())
    rest_b = new[1].adopt(old.shards[1].take_caches())
    assert not rest_b and list(rest_a) == ["s"] and rest_a["s"].layers == (1,)
    keys, values = rest_a["s"].layer(1)
    new[1].install("s", 1, keys, values)
    cached = len(history) - 1
    assert [s.cache_length("s") for s in new] == [cached, cached]
    tokens = run(LocalChain(new), "s", history, 8, pos=cached)
    assert first + tokens == want


def test_a_layer_handed_over_in_pieces_continues_the_answer_exactly(tiny_llama: Path) -> None:
    """A layer past the frame limit crosses as pieces of consecutive positions (lanes.fitted),
    each appended to the last; a piece that does not follow what is held is refused."""
    n = load_spec(tiny_llama).num_units
    want = run(LocalChain.load(tiny_llama), "s", PROMPT, 12)
    old = LocalChain.load(tiny_llama, (3,))
    first = run(old, "s", PROMPT, 4)
    new = [Shard.load(tiny_llama, 0, 2), Shard.load(tiny_llama, 2, n)]
    rest = new[0].adopt(old.shards[0].take_caches())
    new[1].adopt(old.shards[1].take_caches())
    keys, values = rest["s"].layer(1)
    whole = KVFrame(Epoch(1, "a"), "s", 0, 1, to_wire(keys), to_wire(values), "o:1", True)
    pieces = fitted(whole, 550)
    assert len(pieces) >= 3 and [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    with pytest.raises(ValueError, match="positions from"):  # the second before the first
        new[1].install("s", 1, from_wire(pieces[1].keys), from_wire(pieces[1].values), 4)
    for piece in pieces:
        assert isinstance(piece, KVFrame)
        k, v = from_wire(piece.keys), from_wire(piece.values)
        new[1].install("s", 1, k, v, piece.start)
    cached = len(PROMPT) + len(first) - 1
    assert [s.cache_length("s") for s in new] == [cached, cached]
    tokens = run(LocalChain(new), "s", PROMPT + first, 8, pos=cached)
    assert first + tokens == want


def test_a_longer_cache_is_cut_back_and_a_shorter_one_is_reported(tiny_llama: Path) -> None:
    chain = LocalChain.load(tiny_llama, (3,))
    run(chain, "s", PROMPT, 3)
    shard = chain.shards[1]
    assert shard.cache_length("s") == len(PROMPT) + 2  # the third token is not fed yet
    shard.truncate("s", 4)
    assert shard.cache_length("s") == 4
    with pytest.raises(ValueError, match="layer 0 is not in this shard"):
        shard.install("s", 0, *chain.shards[0]._sessions["s"].layer(0))
    assert shard.cache_length("unknown") == 0
