"""The pure SWIM core, election rule and plan fencing, with a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshard.config import TEST_TIMINGS
from meshshard.mesh.election import PlanBook, elect
from meshshard.mesh.membership import Membership
from meshshard.mesh.sanity import FUTURE_SECONDS, future_term, term_at
from meshshard.types import Epoch, Member, NodeId, PlanRecord, PlanStage, State

T = TEST_TIMINGS


def member(name: str, inc: int = 1, state: State = State.ALIVE, prio: int = 0) -> Member:
    return Member(NodeId(name), f"127.0.0.1:{7000 + ord(name[-1])}", inc, state, prio)


def view(*others: Member) -> Membership:
    m = Membership(member("me"), T, now=0.0, rng=random.Random(0))
    for o in others:
        m.apply(o, 0.0)
    return m


@pytest.mark.parametrize(
    "current, update, wins",
    [
        ((1, State.ALIVE), (1, State.SUSPECT), True),
        ((1, State.ALIVE), (0, State.SUSPECT), False),
        ((1, State.SUSPECT), (1, State.ALIVE), False),  # refuting needs a higher incarnation
        ((1, State.SUSPECT), (2, State.ALIVE), True),
        ((1, State.SUSPECT), (1, State.SUSPECT), False),
        ((1, State.ALIVE), (1, State.DEAD), True),
        ((2, State.ALIVE), (1, State.DEAD), False),  # stale death notice
        ((1, State.DEAD), (1, State.ALIVE), False),  # no resurrection at the same incarnation
        ((1, State.DEAD), (2, State.ALIVE), True),  # a restart comes back with a higher one
        ((1, State.LEFT), (1, State.ALIVE), False),
        ((1, State.ALIVE), (2, State.LEFT), True),
    ],
)
def test_swim_precedence(current: tuple[int, State], update: tuple[int, State], wins: bool) -> None:
    m = view(member("a", *current))
    m.apply(member("a", *update), 1.0)
    got = m.get(NodeId("a"))
    assert got is not None
    assert (got.incarnation, got.state) == (update if wins else current)


def test_a_suspicion_about_me_is_refuted_with_a_higher_incarnation() -> None:
    m = view(member("a"))
    m.piggyback()
    m.apply(member("me", inc=1, state=State.SUSPECT), 1.0)
    assert m.me.state == State.ALIVE and m.me.incarnation == 2
    assert m.me in m.piggyback()  # the refutation is gossiped


@pytest.mark.parametrize(
    "forged",
    [
        member("me", inc=5),  # alive, but a higher incarnation: would be believed
        member("me", inc=1, prio=9),  # alive, same incarnation, another priority
        Member(NodeId("me"), "10.6.6.6:1", 1, State.ALIVE),  # another address
        Member(NodeId("me"), "127.0.0.1:7101", 1, State.ALIVE, draining=True),  # newer details
    ],
)
def test_any_record_of_me_others_could_believe_over_mine_is_refuted(forged: Member) -> None:
    m = view()
    before = m.me
    m.apply(forged, 1.0)
    assert m.me.incarnation == forged.incarnation + 1
    assert (m.me.addr, m.me.priority, m.me.draining) == (before.addr, 0, False)


def test_my_own_record_gossiped_back_is_not_refuted() -> None:
    m = view()
    m.update_me(profile_version=3)
    m.apply(member("me", inc=1), 1.0)  # our record before the profile changed: older details
    m.apply(m.me, 1.0)
    assert m.me.incarnation == 1


def test_suspect_dies_after_the_timeout_unless_refuted() -> None:
    m = view(member("a"), member("b"))
    m.probe_failed(NodeId("a"), now=1.0)
    m.probe_failed(NodeId("b"), now=1.0)
    assert m.tick(1.0 + T.suspicion_timeout / 2) == []
    m.apply(member("b", inc=2), 1.1)  # b refutes
    changes = m.tick(1.0 + T.suspicion_timeout)
    assert [(c.member.id, c.member.state) for c in changes] == [("a", State.DEAD)]
    assert m.get(NodeId("b")).state == State.ALIVE  # type: ignore[union-attr]


def test_tombstones_are_forgotten_after_their_ttl() -> None:
    m = view(member("a", state=State.DEAD))
    m.tick(T.tombstone_ttl - 0.01)
    assert m.get(NodeId("a")) is not None
    m.tick(T.tombstone_ttl + 0.01)
    assert m.get(NodeId("a")) is None


def test_leave_is_announced_with_a_higher_incarnation() -> None:
    m = view(member("a"))
    left = m.leave()
    assert left.state == State.LEFT and left.incarnation == 2
    assert left in m.piggyback()


def test_probe_rounds_visit_every_live_member() -> None:
    m = view(*(member(f"p{i}") for i in range(5)), member("d", state=State.DEAD))
    seen = [m.next_probe_target() for _ in range(10)]
    assert sorted(x.id for x in seen if x) == sorted([f"p{i}" for i in range(5)] * 2)


def test_piggyback_sends_each_update_a_bounded_number_of_times() -> None:
    m = view(member("a"), member("b"))
    sent = 0
    for _ in range(100):
        sent += sum(1 for u in m.piggyback() if u.id == "a")
    assert 1 <= sent <= T.retransmit_mult * 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(0, 4),
            st.sampled_from(list(State)),
        ),
        max_size=30,
    )
)
def test_the_view_converges_whatever_the_order(updates: list[tuple[str, int, State]]) -> None:
    """Any two orders of the same updates end in the same view (merges commute)."""
    records = [member(n, inc, s) for n, inc, s in updates]
    a, b = view(), view()
    for r in records:
        a.apply(r, 0.0)
    for r in reversed(records):
        b.apply(r, 0.0)
    assert [(x.id, x.incarnation, x.state in (State.DEAD, State.LEFT)) for x in a.members()] == [
        (x.id, x.incarnation, x.state in (State.DEAD, State.LEFT)) for x in b.members()
    ]


def test_election_picks_highest_priority_then_id() -> None:
    members = [
        member("a", prio=1),
        member("z"),
        member("y", prio=1),
        member("x", state=State.DEAD, prio=9),
    ]
    assert elect(members) == "y"
    assert elect([member("a", state=State.SUSPECT), member("b", state=State.LEFT)]) == "a"
    assert elect([]) is None


def plan(term: int, coordinator: str = "c") -> PlanRecord:
    return PlanRecord(
        Epoch(term, coordinator), "m", "latency", (PlanStage(NodeId("c"), 0, 4),), 1.0, 1.0
    )


def test_plan_book_only_moves_forward() -> None:
    book = PlanBook()
    assert book.offer(plan(3))
    assert not book.offer(plan(2))
    assert not book.offer(plan(3))
    assert book.offer(plan(3, "d"))  # same term, higher coordinator id
    assert book.epoch == Epoch(3, "d")
    assert (
        not book.admits(Epoch(3, "c")) and book.admits(Epoch(3, "d")) and book.admits(Epoch(9, "a"))
    )
    assert book.next_epoch(NodeId("a"), wall=0.0) == Epoch(4, "a")
    book.observe(Epoch(10, "z"))
    assert book.next_epoch(NodeId("a"), wall=0.0) > Epoch(10, "z")


def test_a_new_term_is_at_least_the_clocks() -> None:
    """Terms count seconds, so the largest term a peer accepts (an hour ahead of its clock)
    is outbid by any coordinator soon after: a forged one cannot freeze planning."""
    book, wall = PlanBook(), 1_800_000_000.0
    first = book.next_epoch(NodeId("a"), wall)
    assert first.term == term_at(wall) and book.offer(plan(first.term, "a"))
    assert book.next_epoch(NodeId("a"), wall).term == term_at(wall) + 1  # a second in a second
    forged = term_at(wall + FUTURE_SECONDS)
    assert not future_term(forged, wall) and future_term(forged + 1, wall)
    assert book.offer(plan(forged, "zz"))
    mine = book.next_epoch(NodeId("a"), wall)
    assert mine > Epoch(forged, "zz") and future_term(mine.term, wall)  # refused for now...
    assert book.next_epoch(NodeId("a"), wall) == mine  # ...and not outbid while refused
    assert not future_term(mine.term, wall + 1)  # a second later, believed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from("abcd")), max_size=40))
def test_adopted_epochs_strictly_increase(offers: list[tuple[int, str]]) -> None:
    book = PlanBook()
    adopted = [plan(t, c).epoch for t, c in offers if book.offer(plan(t, c))]
    assert adopted == sorted(set(adopted))
    if offers:
        assert book.epoch == max(Epoch(t, c) for t, c in offers)


def test_our_own_record_is_never_forgotten() -> None:
    m = view(member("a"))
    m.leave()
    m.tick(T.tombstone_ttl * 10)
    assert m.me.state == State.LEFT


def test_replanner_debounces_changes_but_not_a_broken_plan() -> None:
    from meshshard.mesh.coordinator import Replanner, Signature

    r = Replanner(debounce=0.5)
    a, b = Signature((NodeId("x"),), ()), Signature((NodeId("x"), NodeId("y")), ())
    assert r.due(a, 0.0, have_plan=False) is False
    assert r.due(a, 0.6, have_plan=False) is True
    r.done(a)
    assert r.due(a, 5.0, have_plan=True) is False
    assert r.due(b, 5.1, have_plan=True) is False  # a join waits for the debounce
    assert r.due(b, 5.7, have_plan=True) is True
    r.done(b)
    assert r.due(a, 6.0, have_plan=True, urgent=True) is True  # a stage died: no wait


def test_a_refused_probe_is_a_crash_dead_at_once_and_a_silent_one_only_suspected() -> None:
    m = view(member("a"), member("b"))
    change = m.probe_failed(NodeId("a"), 1.0, refused=True)
    assert change is not None and change.member.state == State.DEAD
    change = m.probe_failed(NodeId("b"), 1.0)
    assert change is not None and change.member.state == State.SUSPECT
    # A suspect whose host then refuses us is confirmed dead, without waiting out its timeout.
    change = m.probe_failed(NodeId("b"), 1.1, refused=True)
    assert change is not None and change.member.state == State.DEAD


@pytest.mark.parametrize(
    "heard_at, dead",
    [
        (None, True),  # no frames: dies at the suspicion timeout
        (0.5, True),  # frames before the suspicion: no evidence now
        (1.5, False),  # a frame after it: its timeout counts from that frame
        (1.0 + T.suspicion_timeout - 0.01, False),
    ],
)
def test_a_suspect_whose_frames_keep_arriving_is_not_declared_dead(
    heard_at: float | None, dead: bool
) -> None:
    m = view(member("a"))
    m.probe_failed(NodeId("a"), 1.0)
    heard = {} if heard_at is None else {NodeId("a"): heard_at}
    changes = m.tick(1.0 + T.suspicion_timeout + 0.01, heard)
    assert bool(changes) == dead
    got = m.get(NodeId("a"))
    assert got is not None and got.state == (State.DEAD if dead else State.SUSPECT)


def test_a_message_to_a_suspect_tells_it_of_the_suspicion_first() -> None:
    m = view(member("a"), member("b"))
    m.probe_failed(NodeId("a"), 1.0)
    while m.piggyback():  # every queued update sent its share of times
        pass
    to_a = m.piggyback(to=NodeId("a"))
    assert [(u.id, u.state) for u in to_a] == [("a", State.SUSPECT)]
    assert m.piggyback(to=NodeId("b")) == []  # others are not told again


def test_a_peer_that_seems_to_be_the_slow_one_widens_its_own_timeouts() -> None:
    # Lifeguard's local health: helpers that do not even answer, or suspicions of us to
    # refute, say the slow one may be us; answered probes say we keep up.
    m = view(member("a"))
    assert m.scaled(1.0) == 1.0
    m.missed_nacks(2)
    m.apply(member("me", inc=1, state=State.SUSPECT), 1.0)  # refuted, and counted
    assert m.health == 3 and m.scaled(T.probe_timeout) == 4 * T.probe_timeout
    # A suspect of ours then lives four times the suspicion timeout.
    m.probe_failed(NodeId("a"), 2.0)
    assert m.tick(2.0 + 2 * T.suspicion_timeout) == []
    assert [c.member.state for c in m.tick(2.0 + 4 * T.suspicion_timeout + 0.01)] == [State.DEAD]
    for _ in range(10):
        m.probe_answered()
    assert m.health == 0
    m.missed_nacks(100)
    assert m.health == 8  # bounded


def suspected_by(name: str, accuser: str, inc: int = 1) -> Member:
    return Member(NodeId(name), member(name).addr, inc, State.SUSPECT, accuser=NodeId(accuser))


@pytest.mark.parametrize(
    "others, accusers, lives",
    [
        # Members besides us: a suspicion only we hold lasts the lone timeout ...
        ("abcd", [], T.suspicion_timeout),
        # ... each independent accuser shortens it, the first most (log-shaped) ...
        ("abcd", ["b"], None),
        ("abcd", ["b", "c"], None),
        ("abcd", ["b", "c", "d"], T.suspicion_confirmed),
        ("abcd", ["b", "b", "c", "c", "d"], T.suspicion_confirmed),  # each counted once
        # ... down to the floor once as many as can confirm have (3 members: one other).
        ("ab", ["b"], T.suspicion_confirmed),
        # With nobody else to ask, it is the lone timeout.
        ("a", [], T.suspicion_timeout),
    ],
)
def test_a_suspicion_shortens_as_independent_accusers_confirm_it(
    others: str, accusers: list[str], lives: float | None
) -> None:
    m = view(*(member(c) for c in others))
    m.probe_failed(NodeId("a"), 1.0)
    for accuser in accusers:
        m.apply(suspected_by("a", accuser), 1.1)
    timeout = m.suspicion_timeout(NodeId("a"))
    if lives is None:
        assert T.suspicion_confirmed < timeout < T.suspicion_timeout
    else:
        assert timeout == pytest.approx(lives)
    assert m.tick(1.0 + timeout - 0.01) == []
    assert [c.member.state for c in m.tick(1.0 + timeout + 0.01)] == [State.DEAD]


def test_more_accusers_never_lengthen_a_suspicion() -> None:
    m = view(*(member(c) for c in "abcdef"))
    m.probe_failed(NodeId("a"), 1.0)
    timeouts = [m.suspicion_timeout(NodeId("a"))]
    for accuser in "bcdef":
        m.apply(suspected_by("a", accuser), 1.1)
        timeouts.append(m.suspicion_timeout(NodeId("a")))
    assert timeouts == sorted(timeouts, reverse=True) and timeouts[0] > timeouts[-1]


def test_a_confirmation_is_passed_on_once_and_a_refutation_clears_it() -> None:
    m = view(member("a"), member("b"), member("c"))
    m.apply(suspected_by("a", "b"), 1.0)  # heard of b's suspicion: not our own yet
    while m.piggyback():
        pass
    assert m.probe_failed(NodeId("a"), 1.2) is None  # our probe fails too: a confirmation
    sent = [u for u in m.piggyback() if u.id == "a"]
    assert [(u.state, u.accuser) for u in sent] == [(State.SUSPECT, "me")]
    while m.piggyback():
        pass
    m.apply(suspected_by("a", "b"), 1.3)  # an accuser we know: nothing new to pass on
    assert m.piggyback() == []
    m.apply(member("a", inc=2), 1.4)  # a refutes: the next suspicion starts afresh
    assert m.get(NodeId("a")).accuser is None  # type: ignore[union-attr]
    m.apply(suspected_by("a", "c", inc=2), 1.5)
    assert m.suspicion_timeout(NodeId("a")) == pytest.approx(T.suspicion_timeout)
    dead = m.tick(1.5 + T.suspicion_timeout + 0.01)
    assert [(c.member.state, c.member.accuser) for c in dead] == [(State.DEAD, None)]
