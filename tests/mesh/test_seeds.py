"""Seeds and discovered addresses, pure: tried at once, backed off, pruned, bounded."""

from __future__ import annotations

from meshshard.mesh.seeds import GIVEN_UP_SECONDS, LIMIT, MAX_WAIT, TRIES, Seeds


def test_a_found_address_that_never_answers_is_forgotten_after_its_tries() -> None:
    seeds, now = Seeds(), 0.0
    assert seeds.add("10.0.0.9:7117", now)
    tried = []
    while (now := now + 0.25) < 60:
        if (addr := seeds.due(now, set())) is not None:
            tried.append(now)
            seeds.failed(addr, now)
    assert len(tried) == TRIES == seeds.tries and "10.0.0.9:7117" not in seeds
    assert tried[1] - tried[0] < tried[2] - tried[1]  # waits double
    # Found again (a spoofed record is re-announced): not tried again for a while.
    assert not seeds.add("10.0.0.9:7117", now) and seeds.due(now, set()) is None
    assert seeds.add("10.0.0.9:7117", now + GIVEN_UP_SECONDS)


def test_a_seed_given_by_hand_is_kept_but_tried_at_most_every_max_wait() -> None:
    seeds, now, tried = Seeds(), 0.0, []
    seeds.add("10.0.0.2:7117", now, configured=True)
    while (now := now + 0.5) < 600:
        if (addr := seeds.due(now, set())) is not None:
            tried.append(now)
            seeds.failed(addr, now)
    assert "10.0.0.2:7117" in seeds
    assert min(b - a for a, b in zip(tried[-5:], tried[-4:], strict=False)) >= MAX_WAIT
    seeds.answered("10.0.0.2:7117", now)
    assert seeds.due(now + MAX_WAIT, {"10.0.0.2:7117"}) is None  # a member: not a seed now


def test_a_flood_of_found_addresses_is_bounded_and_seeds_still_get_in() -> None:
    seeds = Seeds()
    added = sum(seeds.add(f"10.1.{i // 250}.{i % 250}:7117", 0.0) for i in range(10_000))
    assert added == LIMIT and len(seeds) == LIMIT
    assert seeds.add("10.0.0.2:7117", 0.0, configured=True)  # the user's own seed is kept
    # Once the bogus ones have failed their tries, room frees for real peers.
    now = 0.0
    while (now := now + 0.25) < 30:
        while (addr := seeds.due(now, set())) is not None:
            seeds.failed(addr, now)
    assert len(seeds) == 1 and seeds.add("10.0.0.3:7117", now)


def test_an_address_that_answered_is_tried_again_only_while_it_is_no_member() -> None:
    seeds = Seeds()
    seeds.add("10.0.0.4:7117", 0.0)
    assert seeds.due(0.0, set()) == "10.0.0.4:7117"
    seeds.answered("10.0.0.4:7117", 0.0)
    assert seeds.due(MAX_WAIT, {"10.0.0.4:7117"}) is None  # a member: gossip reaches it
    assert seeds.due(MAX_WAIT, set()) == "10.0.0.4:7117"  # lost (a partition): try again
    for i in range(TRIES):  # gone for good: pruned
        seeds.failed("10.0.0.4:7117", MAX_WAIT + 100 * i)
    assert "10.0.0.4:7117" not in seeds
