"""Mesh key, sealed envelopes and the replay window: pure, deterministic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshshard.errors import MeshShardError
from meshshard.security import (
    CONTROL,
    CONTROL_REPLY,
    DATA,
    KEY_ID_BYTES,
    MAGIC,
    WINDOW,
    AuthError,
    Keyring,
    ReplayWindow,
    Sealer,
    new_key,
    write_key_file,
)

K1, K2 = bytes(range(32)), bytes(range(1, 33))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def pair(sender_keys: tuple[bytes, ...], receiver_keys: tuple[bytes, ...], mesh: str = "m"):
    clock = Clock()
    return (
        Sealer(Keyring(sender_keys), mesh, clock),
        Sealer(Keyring(receiver_keys), mesh, clock),
        clock,
    )


def test_a_sealed_message_opens_once_for_its_purpose() -> None:
    a, b, _ = pair((K1,), (K1,))
    sealed = a.seal(DATA, b"activations")
    assert b"activations" not in sealed  # encrypted, not only signed
    assert b.open(DATA, sealed) == b"activations"
    with pytest.raises(AuthError, match="replayed"):
        b.open(DATA, sealed)
    with pytest.raises(AuthError, match="authentication failed"):
        b.open(CONTROL, a.seal(CONTROL_REPLY, b"x"))
    assert b.refused == 2


def test_a_message_opens_only_for_what_it_was_sealed_for() -> None:
    """Sealed for one recipient, request or connection, a message opens for no other."""
    a, b, _ = pair((K1,), (K1,))
    request = a.seal(CONTROL, b"ping", b"10.0.0.2:7117")
    with pytest.raises(AuthError, match="recipient"):
        b.open(CONTROL, request, (b"10.0.0.3:7117",))
    # A receiver may go by several names: the one it announces and the one it was reached at.
    assert b.open(CONTROL, request, (b"10.0.0.9:1", b"10.0.0.2:7117")) == b"ping"
    reply = b.seal(CONTROL_REPLY, b"ack", Sealer.header(request))
    other = a.seal(CONTROL, b"ping", b"10.0.0.2:7117")
    with pytest.raises(AuthError):
        a.open(CONTROL_REPLY, reply, (Sealer.header(other),))  # an answer to another request
    assert a.open(CONTROL_REPLY, reply, (Sealer.header(request),)) == b"ack"


def test_every_run_seals_under_its_own_subkey() -> None:
    """Two runs under one key share no salt, so their counters may meet without a nonce
    ever repeating under one key; the receiver tells their windows apart."""
    clock = Clock()
    runs = [Sealer(Keyring((K1,)), "m", clock) for _ in range(50)]
    firsts = [run.seal(DATA, b"x") for run in runs]
    assert len({Sealer.header(f) for f in firsts}) == 50  # same counter 1, different salts
    receiver = Sealer(Keyring((K1,)), "m", clock)
    assert all(receiver.open(DATA, f) == b"x" for f in firsts)
    # The same bytes under a subkey derived for another salt do not open.
    forged = bytearray(firsts[0])
    forged[len(MAGIC) + KEY_ID_BYTES] ^= 1  # one bit of the salt
    with pytest.raises(AuthError, match="authentication failed"):
        receiver.open(DATA, bytes(forged))


def test_other_keys_meshes_and_tampering_are_refused() -> None:
    a, b, _ = pair((K1,), (K2,))
    with pytest.raises(AuthError, match="does not hold"):
        b.open(DATA, a.seal(DATA, b"x"))
    a, b, _ = pair((K1,), (K1,))
    b.mesh = "other"
    with pytest.raises(AuthError, match="authentication failed"):
        b.open(DATA, a.seal(DATA, b"x"))
    b.mesh = "m"
    sealed = bytearray(a.seal(DATA, b"payload"))
    sealed[-20] ^= 1
    with pytest.raises(AuthError, match="authentication failed"):
        b.open(DATA, bytes(sealed))
    with pytest.raises(AuthError, match="not a sealed message"):
        b.open(DATA, b"\xa1av\x01")  # plain CBOR from a peer without a key


def test_rotation_the_first_key_seals_every_key_opens() -> None:
    old, new = Sealer(Keyring((K1, K2)), "m"), Sealer(Keyring((K2, K1)), "m")
    assert new.open(DATA, old.seal(DATA, b"a")) == b"a"
    assert old.open(DATA, new.seal(DATA, b"b")) == b"b"
    assert old.accepts_fingerprint(new.fingerprint) and new.fingerprint != old.fingerprint
    assert not Sealer(Keyring((K1,)), "m").accepts_fingerprint(new.fingerprint)


def test_stale_messages_are_refused() -> None:
    a, b, clock = pair((K1,), (K1,))
    sealed = a.seal(DATA, b"x")
    clock.now += 121
    with pytest.raises(AuthError, match="stale"):
        b.open(DATA, sealed)


def test_replay_window_takes_late_messages_once_and_forgets_old_senders() -> None:
    w = ReplayWindow(senders=2)
    assert [w.admit(b"t", c) for c in (5, 3, 4, 3, 5)] == [True, True, True, False, False]
    assert w.admit(b"t", 5 + WINDOW)
    assert not w.admit(b"t", 5)  # fell out of the window
    assert w.admit(b"u", 1) and w.admit(b"v", 1)
    assert w.admit(b"t", 1)  # forgotten: the freshness bound covers this case


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3 * WINDOW), max_size=200))
def test_replay_window_never_admits_a_pair_twice(counters: list[int]) -> None:
    w = ReplayWindow()
    admitted = [c for c in counters if w.admit(b"t", c)]
    assert len(admitted) == len(set(admitted))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_opens(data: bytes) -> None:
    _, b, _ = pair((K1,), (K1,))
    with pytest.raises(AuthError):
        b.open(DATA, data)


def test_insecure_mode_passes_payloads_through() -> None:
    s = Sealer(None, "m")
    assert s.open(DATA, s.seal(DATA, b"x")) == b"x" and s.fingerprint == ""
    assert not s.accepts_fingerprint(Sealer(Keyring((K1,)), "m").fingerprint)


def test_key_files_are_owner_only_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "mesh.key"
    key = new_key()
    write_key_file(path, key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Keyring.load(path).keys == (key,)
    with pytest.raises(FileExistsError):
        write_key_file(path, new_key())
    os.chmod(path, 0o644)
    with pytest.raises(MeshShardError, match="chmod 600"):
        Keyring.load(path)
    bad = tmp_path / "bad.key"
    bad.write_text("# comment\nnot-hex\n")
    bad.chmod(0o600)
    with pytest.raises(MeshShardError, match=r"bad\.key:2"):
        Keyring.load(bad)
    with pytest.raises(MeshShardError, match="cannot read"):
        Keyring.load(tmp_path / "missing.key")
