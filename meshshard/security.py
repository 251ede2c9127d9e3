"""The mesh key: a keyring on disk, and sealed envelopes for every peer-to-peer message.

An envelope is `MS 1 | key id (8) | nonce (12) | AES-256-GCM(timestamp ms (8) | payload)`.
The mesh name, the message's purpose and the header are the associated data, so a message
sealed for one mesh or one purpose (a gossip request, its answer, a data frame) opens nowhere
else. A nonce is the sender's random 4-byte tag for this run plus a counter, so it never
repeats under a key; the receiver keeps a sliding window per sender tag and refuses anything it
has seen, and anything older than FRESH_SECONDS (which bounds a replay to a receiver that
restarted since).

The first key of a keyring seals; every key opens. Rotating a mesh's key without downtime:
add the new key as a second line on every peer, then make it the first line everywhere, then
remove the old one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshshard.errors import MeshShardError

MAGIC = b"MS\x01"
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16  # the GCM authentication tag
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + 8 + TAG_BYTES  # what sealing adds to a payload
FRESH_SECONDS = 120.0  # a message stamped further from our clock than this is refused
WINDOW = 1024  # out-of-order messages accepted behind the newest from one sender
MAX_SENDERS = 4096  # sender tags remembered (least recently heard forgotten first)

CONTROL = b"control"  # a gossip request
CONTROL_REPLY = b"control-reply"
DATA = b"data"  # a data-plane frame
PROBE = b"probe"  # a link measurement request


class AuthError(Exception):
    """A message that is not sealed with a key we hold, was tampered with, or was seen before."""


@dataclass(frozen=True)
class Keyring:
    """Mesh keys, the first for sealing, all for opening."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise ValueError(f"a keyring holds one or more keys of {KEY_BYTES} bytes")

    @property
    def fingerprint(self) -> str:
        """Of the sealing key: all mDNS says about it, to find peers of the same mesh."""
        return key_id(self.keys[0]).hex()

    @property
    def fingerprints(self) -> frozenset[str]:
        return frozenset(key_id(k).hex() for k in self.keys)

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
    """Which (sender tag, counter) pairs were seen: the newest per sender and a bitmap of the
    WINDOW before it. Pure: no clock, no I/O."""

    def __init__(self, senders: int = MAX_SENDERS) -> None:
        self._senders = senders
        self._seen: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # tag -> (top, bits)

    def admit(self, tag: bytes, counter: int) -> bool:
        """True (and remembered) if this pair is new and not too far behind its sender."""
        entry = self._seen.get(tag)
        if entry is None:
            self._remember(tag, counter, 1)
            return True
        top, bits = entry
        if counter > top:
            shift = counter - top
            bits = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self._remember(tag, counter, bits)
            return True
        behind = top - counter
        if behind >= WINDOW or bits >> behind & 1:
            return False
        self._remember(tag, top, bits | 1 << behind)
        return True

    def _remember(self, tag: bytes, top: int, bits: int) -> None:
        self._seen[tag] = (top, bits)
        self._seen.move_to_end(tag)
        while len(self._seen) > self._senders:
            self._seen.popitem(last=False)


@dataclass
class Sealer:
    """Seals and opens envelopes for one mesh. `keyring=None` is the insecure mode: payloads
    travel as they are (an explicit choice, warned about at start)."""

    keyring: Keyring | None
    mesh: str
    clock: Callable[[], float] = time.time
    _tag: bytes = field(default_factory=lambda: secrets.token_bytes(4))
    _counter: int = 0
    _window: ReplayWindow = field(default_factory=ReplayWindow)
    refused: int = 0

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    @property
    def fingerprint(self) -> str:
        return self.keyring.fingerprint if self.keyring else ""

    def accepts_fingerprint(self, fp: str) -> bool:
        return fp in self.keyring.fingerprints if self.keyring else fp == ""

    def seal(self, purpose: bytes, payload: bytes) -> bytes:
        if self.keyring is None:
            return payload
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self.keyring.keys[0]
        self._counter += 1
        nonce = self._tag + struct.pack(">Q", self._counter)
        header = MAGIC + key_id(key) + nonce
        stamp = struct.pack(">Q", int(self.clock() * 1000))
        sealed = AESGCM(key).encrypt(nonce, stamp + payload, self._aad(purpose, header))
        return header + sealed

    def open(self, purpose: bytes, data: bytes) -> bytes:
        """The payload, or AuthError (counted in `refused`)."""
        if self.keyring is None:
            return data
        try:
            return self._open(purpose, data, self.keyring.keys)
        except AuthError:
            self.refused += 1
            raise

    def _open(self, purpose: bytes, data: bytes, keys: Sequence[bytes]) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(data) < OVERHEAD or not data.startswith(MAGIC):
            raise AuthError("not a sealed message (is the sender running without a mesh key?)")
        header = data[:HEADER_BYTES]
        kid = header[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        key = next((k for k in keys if key_id(k) == kid), None)
        if key is None:
            raise AuthError(f"sealed with key {kid.hex()}, which this mesh does not hold")
        nonce = header[-NONCE_BYTES:]
        try:
            plain = AESGCM(key).decrypt(nonce, data[HEADER_BYTES:], self._aad(purpose, header))
        except InvalidTag:
            raise AuthError("authentication failed (tampered, or sealed for another use)") from None
        stamp = struct.unpack(">Q", plain[:8])[0] / 1000
        if abs(self.clock() - stamp) > FRESH_SECONDS:
            raise AuthError(f"stale: stamped {self.clock() - stamp:.0f} s from our clock")
        if not self._window.admit(nonce[:4], struct.unpack(">Q", nonce[4:])[0]):
            raise AuthError("replayed")
        return plain[8:]

    def _aad(self, purpose: bytes, header: bytes) -> bytes:
        return b"meshshard/1\x00" + self.mesh.encode() + b"\x00" + purpose + b"\x00" + header
