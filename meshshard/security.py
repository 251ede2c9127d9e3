"""The mesh key: a keyring on disk, and sealed envelopes for every peer-to-peer message.

An envelope is `MS 2 | key id (8) | salt (16) | counter (8) | AES-256-GCM(timestamp ms (8) |
payload)`. Each process run seals under its own subkey, HKDF(mesh key, salt), with a fresh
128-bit random salt sent in the clear, and counts its messages: a (subkey, nonce) pair never
repeats, however often peers restart under one long-lived key (a short random prefix per run
would, after tens of thousands of restarts, by the birthday bound).

The associated data binds the mesh name, the message's purpose (a gossip request, its answer,
a data record, ...), the header, and what the message is for: the address of the peer it was
sent to, the request an answer answers, or the connection a data record travels on. A message
sealed for one mesh, purpose, recipient, request or connection opens nowhere else. The receiver
keeps a sliding window per sender salt and refuses anything it has seen, and anything stamped
further than FRESH_SECONDS from its clock (which bounds a replay to a receiver that restarted
since).

The first key of a keyring seals; every key opens. Rotating a mesh's key without downtime:
add the new key as a second line on every peer, then make it the first line everywhere, then
remove the old one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshshard.errors import MeshShardError

MAGIC = b"MS\x02"
KEY_BYTES = 32
KEY_ID_BYTES = 8
SALT_BYTES = 16  # names one sender's run; its subkey is derived from it
COUNTER_BYTES = 8
TAG_BYTES = 16  # the GCM authentication tag
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + SALT_BYTES + COUNTER_BYTES
OVERHEAD = HEADER_BYTES + 8 + TAG_BYTES  # what sealing adds to a payload
FRESH_SECONDS = 120.0  # a message stamped further from our clock than this is refused
WINDOW = 1024  # out-of-order messages accepted behind the newest from one sender
MAX_SENDERS = 4096  # sender runs remembered (least recently heard forgotten first)

CONTROL = b"control"  # a gossip request, bound to its recipient's address
CONTROL_REPLY = b"control-reply"  # bound to the request it answers
DATA = b"data"  # a data-plane record, bound to its connection and direction
PROBE = b"probe"  # a link measurement request, bound to its recipient's address
PROBE_REPLY = b"probe-reply"  # bound to the request it answers
CHANNEL = b"channel"  # opens a data-plane WebSocket, bound to its recipient's address


class AuthError(Exception):
    """A message that is not sealed with a key we hold, was tampered with, or was seen before."""


@dataclass(frozen=True)
class Keyring:
    """Mesh keys, the first for sealing, all for opening."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise ValueError(f"a keyring holds one or more keys of {KEY_BYTES} bytes")

    @functools.cached_property
    def ids(self) -> dict[bytes, bytes]:
        """Each key by its id, the sealing key's first. Once: every frame sealed or opened
        names one, and a hash costs 0.03 ms on a data-plane hop's critical path after a pass
        has flushed the caches."""
        return {key_id(k): k for k in self.keys}

    @property
    def fingerprint(self) -> str:
        """Of the sealing key: all mDNS says about it, to find peers of the same mesh."""
        return next(iter(self.ids)).hex()

    @property
    def fingerprints(self) -> frozenset[str]:
        return frozenset(i.hex() for i in self.ids)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """A key file: one hex key per line, the sealing key first; '#' starts a comment."""
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as e:
            raise MeshShardError(f"cannot read the key file {path}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MeshShardError(f"the key file {path} is open to other users (chmod 600 {path})")
        keys = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key = bytes.fromhex(line)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise MeshShardError(f"{path}:{n}: a key is {KEY_BYTES * 2} hex digits")
            keys.append(key)
        if not keys:
            raise MeshShardError(f"the key file {path} holds no key")
        return cls(tuple(keys))


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key_file(path: Path, key: bytes) -> None:
    """A new key file readable by its owner only; never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# meshshard mesh key {key_id(key).hex()}: the first line seals\n{key.hex()}\n")


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"meshshard key id\x00" + key).digest()[:KEY_ID_BYTES]


class ReplayWindow:
    """Which (sender, counter) pairs were seen: the newest per sender and a bitmap of the
    WINDOW before it. Pure: no clock, no I/O."""

    def __init__(self, senders: int = MAX_SENDERS) -> None:
        self._senders = senders
        self._seen: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # -> (top, bits)

    def admit(self, sender: bytes, counter: int) -> bool:
        """True (and remembered) if this pair is new and not too far behind its sender."""
        entry = self._seen.get(sender)
        if entry is None:
            self._remember(sender, counter, 1)
            return True
        top, bits = entry
        if counter > top:
            shift = counter - top
            bits = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self._remember(sender, counter, bits)
            return True
        behind = top - counter
        if behind >= WINDOW or bits >> behind & 1:
            return False
        self._remember(sender, top, bits | 1 << behind)
        return True

    def _remember(self, sender: bytes, top: int, bits: int) -> None:
        self._seen[sender] = (top, bits)
        self._seen.move_to_end(sender)
        while len(self._seen) > self._senders:
            self._seen.popitem(last=False)


@dataclass
class Sealer:
    """Seals and opens envelopes for one mesh. `keyring=None` is the insecure mode: payloads
    travel as they are (an explicit choice, warned about at start)."""

    keyring: Keyring | None
    mesh: str
    clock: Callable[[], float] = time.time
    _salt: bytes = field(default_factory=lambda: secrets.token_bytes(SALT_BYTES))
    _counter: int = 0
    _window: ReplayWindow = field(default_factory=ReplayWindow)
    # Subkeys of senders heard from, (key id, salt) -> cipher; only for messages that opened.
    _ciphers: OrderedDict[bytes, Any] = field(default_factory=OrderedDict)
    refused: int = 0

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    @property
    def fingerprint(self) -> str:
        return self.keyring.fingerprint if self.keyring else ""

    def accepts_fingerprint(self, fp: str) -> bool:
        return fp in self.keyring.fingerprints if self.keyring else fp == ""

    def seal(self, purpose: bytes, payload: bytes, bind: bytes = b"") -> bytes:
        """`payload` sealed for `purpose` and for what `bind` names (a recipient, a request,
        a connection), which the receiver must name alike to open it."""
        if self.keyring is None:
            return payload
        kid, key = next(iter(self.keyring.ids.items()))
        self._counter += 1
        header = MAGIC + kid + self._salt + struct.pack(">Q", self._counter)
        stamp = struct.pack(">Q", int(self.clock() * 1000))
        cipher = self._cipher(kid + self._salt, key)
        sealed = cipher.encrypt(
            _nonce(self._counter), stamp + payload, self._aad(purpose, header, bind)
        )
        return header + sealed

    @staticmethod
    def header(sealed: bytes) -> bytes:
        """What an answer to `sealed` is bound to: its header (unique per message)."""
        return sealed[:HEADER_BYTES] if sealed.startswith(MAGIC) else b""

    def open(self, purpose: bytes, data: bytes, binds: Sequence[bytes] = (b"",)) -> bytes:
        """The payload of a message sealed for `purpose` and one of `binds`, or AuthError
        (counted in `refused`)."""
        if self.keyring is None:
            return data
        try:
            return self._open(purpose, data, self.keyring.ids, binds)
        except AuthError:
            self.refused += 1
            raise

    def _open(
        self, purpose: bytes, data: bytes, keys: Mapping[bytes, bytes], binds: Sequence[bytes]
    ) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(data) < OVERHEAD or not data.startswith(MAGIC):
            raise AuthError("not a sealed message (is the sender running without a mesh key?)")
        header = data[:HEADER_BYTES]
        kid = header[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        salt = header[len(MAGIC) + KEY_ID_BYTES : -COUNTER_BYTES]
        counter = struct.unpack(">Q", header[-COUNTER_BYTES:])[0]
        key = keys.get(kid)
        if key is None:
            raise AuthError(f"sealed with key {kid.hex()}, which this mesh does not hold")
        cipher = self._ciphers.get(kid + salt) or _derive(key, salt)
        plain = None
        for bind in dict.fromkeys(binds):  # in order, without repeats
            try:
                aad = self._aad(purpose, header, bind)
                plain = cipher.decrypt(_nonce(counter), data[HEADER_BYTES:], aad)
                break
            except InvalidTag:
                continue
        if plain is None:
            raise AuthError(
                "authentication failed (tampered, or sealed for another use or recipient)"
            )
        stamp = struct.unpack(">Q", plain[:8])[0] / 1000
        if abs(self.clock() - stamp) > FRESH_SECONDS:
            raise AuthError(f"stale: stamped {self.clock() - stamp:.0f} s from our clock")
        if not self._window.admit(salt, counter):
            raise AuthError("replayed")
        self._remember(kid + salt, cipher)
        return plain[8:]

    def _cipher(self, name: bytes, key: bytes) -> Any:
        cipher = self._ciphers.get(name)
        if cipher is None:
            cipher = _derive(key, name[KEY_ID_BYTES:])
            self._remember(name, cipher)
        return cipher

    def _remember(self, name: bytes, cipher: Any) -> None:
        self._ciphers[name] = cipher
        self._ciphers.move_to_end(name)
        while len(self._ciphers) > MAX_SENDERS:
            self._ciphers.popitem(last=False)

    def _aad(self, purpose: bytes, header: bytes, bind: bytes) -> bytes:
        parts = (self.mesh.encode(), purpose, header, bind)
        return b"meshshard/2" + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _nonce(counter: int) -> bytes:
    return bytes(4) + struct.pack(">Q", counter)


def _derive(key: bytes, salt: bytes) -> Any:
    """The AES-GCM cipher of one sender's run: its subkey is HKDF-SHA256(key, salt)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(hashes.SHA256(), KEY_BYTES, salt, b"meshshard/2 run key")
    return AESGCM(hkdf.derive(key))
