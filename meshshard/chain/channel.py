"""How a data-plane socket's frames are sealed (links.py carries them).

A socket opens only for a peer of the mesh: the upgrade request carries a connection token
sealed for the address it is sent to, and without one it is refused (401, 403) before the
socket exists. Frames then travel as sealed records of at most RECORD_BYTES, bound to that
connection and direction, so no one without the key makes a peer buffer more than one record,
and a record cannot be replayed on another socket.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from meshshard.security import CHANNEL, DATA, OVERHEAD, AuthError, Sealer
from meshshard.wire import MAX_FRAME_BYTES, DataFrame, WireError, decode_frame, encode_frame

RECORD_BYTES = 1 << 20  # the most of a frame one sealed record carries
CHANNEL_HEADER = "X-MeshShard-Channel"
TOKEN_BYTES = 16
MAX_ADDRESS = 255  # bytes of the sender's address an upgrade may name
_MORE, _LAST = b"\x00", b"\x01"
_NUMBER = 8  # bytes of a record's frame number


@dataclass
class FrameCodec:
    """Frames to plain bytes and back, and the limits of a data-plane socket."""

    sealer: Sealer
    hidden_size: int | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES
    received_bytes: int = 0
    # This peer's address, named in the upgrades it sends: the other side then knows whose
    # frames arrive on the socket (evidence that we are alive).
    me: str = ""

    @property
    def record_bytes(self) -> int:
        return min(RECORD_BYTES, self.max_frame_bytes)

    @property
    def max_message(self) -> int:
        """The largest WebSocket message to read at all (checked before reading it)."""
        return self.record_bytes + 1 + _NUMBER + OVERHEAD

    @property
    def socket_limit(self) -> int:
        """aiohttp's max_msg_size for a data-plane socket: one more than the largest record,
        as aiohttp refuses a message of exactly its limit (a full record then closed the
        socket with 1009, and the frame was lost, under a long prompt's rows)."""
        return self.max_message + 1

    def channel(self, token: bytes, outbound: bool) -> Channel:
        return Channel(self, token, outbound)

    def decode(self, plain: bytes) -> DataFrame:
        return decode_frame(plain, self.hidden_size, self.max_frame_bytes)


@dataclass
class Channel:
    """One socket's sealing: a frame goes out as records bound to this connection and our
    direction, each `more or last (1) | frame number (8) | piece`; records coming in are opened
    and joined into frames. A record that does not open is refused alone (it cannot belong to
    any frame); a frame past the size limit is refused as soon as it is, and its later records
    are skipped."""

    codec: FrameCodec
    token: bytes
    outbound: bool
    _sent: int = 0
    _frame: int = -1  # the number of the frame arriving
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0
    _skipping: bool = False

    def seal(self, frame: DataFrame) -> list[bytes]:
        plain = encode_frame(frame)
        if len(plain) > self.codec.max_frame_bytes:
            raise WireError(f"frame of {len(plain)} bytes exceeds {self.codec.max_frame_bytes}")
        step = self.codec.record_bytes
        bind = self._bind(self.outbound)
        number = struct.pack(">Q", self._sent)
        self._sent += 1
        pieces = [plain[i : i + step] for i in range(0, len(plain), step)] or [b""]
        return [
            self.codec.sealer.seal(
                DATA, (_LAST if i == len(pieces) - 1 else _MORE) + number + piece, bind
            )
            for i, piece in enumerate(pieces)
        ]

    def open(self, data: bytes) -> DataFrame | None:
        """The frame this record completes; None while more records are to come, or for a
        record of a refused frame; WireError or AuthError for a record or frame to refuse."""
        if len(data) > self.codec.max_message:
            raise WireError(f"record of {len(data)} bytes exceeds {self.codec.max_message}")
        self.codec.received_bytes += len(data)
        plain = self.codec.sealer.open(DATA, data, (self._bind(not self.outbound),))
        if len(plain) < 1 + _NUMBER or plain[:1] not in (_MORE, _LAST):
            raise WireError("a record starts with its more/last flag and frame number")
        last, number = plain[:1] == _LAST, struct.unpack(">Q", plain[1 : 1 + _NUMBER])[0]
        if number != self._frame:  # a new frame; the sender abandoned any before it
            self._frame, self._parts, self._size, self._skipping = number, [], 0, False
        if self._skipping:
            return None
        self._size += len(plain) - 1 - _NUMBER
        if self._size > self.codec.max_frame_bytes:
            self._parts, self._skipping = [], True
            raise WireError(f"frame exceeds {self.codec.max_frame_bytes} bytes")
        self._parts.append(plain[1 + _NUMBER :])
        if not last:
            return None
        whole, self._parts = b"".join(self._parts), []
        return self.codec.decode(whole)

    def _bind(self, outbound: bool) -> bytes:
        return self.token + (b">" if outbound else b"<")


def sealed_token(sealer: Sealer, addr: str, me: str = "") -> tuple[bytes, bytes]:
    """A new connection token, and it sealed for `addr` with the sender's address `me`."""
    token = secrets.token_bytes(TOKEN_BYTES)
    return token, sealer.seal(CHANNEL, token + me.encode(), addr.encode())


def opened_token(sealer: Sealer, sealed: bytes, names: Sequence[bytes]) -> tuple[bytes, str]:
    """The connection token sealed for one of `names`, and the sender's address; AuthError
    for one that does not open."""
    plain = sealer.open(CHANNEL, sealed, names)
    try:
        sender = plain[TOKEN_BYTES:].decode()
    except UnicodeDecodeError as e:
        raise AuthError(f"a connection token's address: {e}") from None
    if len(plain) < TOKEN_BYTES or len(sender) > MAX_ADDRESS:
        raise AuthError("a connection token is 16 bytes and an address")
    return plain[:TOKEN_BYTES], sender


def open_request(sealer: Sealer, addr: str, me: str = "") -> tuple[bytes, dict[str, str]]:
    """A new connection token, and the upgrade header that carries it sealed for `addr`,
    with the sender's address `me`."""
    token, sealed = sealed_token(sealer, addr, me)
    return token, {CHANNEL_HEADER: base64.b64encode(sealed).decode()}


def accept_token(request: web.Request, sealer: Sealer, names: Sequence[bytes]) -> tuple[bytes, str]:
    """The connection token of an upgrade request sealed for one of `names`, and the
    sender's address; 401 without one and 403 for one that does not open, before any
    socket exists."""
    raw = request.headers.get(CHANNEL_HEADER)
    if raw is None:
        raise web.HTTPUnauthorized(text=f"a data-plane socket needs a sealed {CHANNEL_HEADER}")
    try:
        return opened_token(sealer, base64.b64decode(raw, validate=True), names)
    except (binascii.Error, AuthError) as e:
        raise web.HTTPForbidden(text=f"refused: {e}") from None
