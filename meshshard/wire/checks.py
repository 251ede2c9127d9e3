"""What every wire decoder shares: the CBOR loader with its size and version check, the
limits, and validators that give each field a type and a range or raise WireError."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import cbor2

from meshshard.types import Epoch

PROTOCOL = 4  # 4: a wave's rows go to the first stage for its whole head (`together`)
MAX_CONTROL_BYTES = 1 << 20  # a control message larger than this is refused unread
MAX_ITEMS = 4096  # members, profiles, stages, units or links in one message
# Every number has a range, far inside what the codec carries (2**63), so a peer that takes
# the largest value it accepts can still count past it: a forged incarnation or term at the
# edge of the range cannot lock a member out or freeze planning.
MAX_INCARNATION = 2**53  # milliseconds since 1970 at a member's start, plus its refutations
MAX_TERM = 2**40  # seconds since 2025, plus replans
MAX_VERSION = 2**53  # profile versions
MAX_COUNT = 2**31  # steps, positions, tokens, attempts, layers, units
MAX_MEMORY = 1e15  # bytes
MAX_FRAME_LIMIT = 1 << 40  # the largest --max-frame a profile may say, bytes
MAX_MS = 1e7  # any time in milliseconds
MIN_MBPS, MAX_MBPS = 1e-3, 1e6  # a link's rate (a smaller one turns hop times infinite)
MAX_LOAD = 1e6  # sessions
MIN_PACE, MAX_PACE = 0.01, 100.0  # passes as measured over what a profile says


class WireError(ValueError):
    """A message that does not decode into a valid typed message."""


def epoch(raw: object) -> Epoch:
    pair = a_list(raw, "epoch")
    if len(pair) != 2:
        raise WireError("epoch must be [term, coordinator]")
    term = integer(pair[0], "epoch.term", high=MAX_TERM)
    return Epoch(term, text(pair[1], "epoch.coordinator", empty=True))


def load(data: bytes, limit: int, what: str) -> dict[Any, Any]:
    """A CBOR map of our protocol version, within `limit` bytes, or WireError."""
    if len(data) > limit:
        raise WireError(f"{what} of {len(data)} bytes exceeds {limit}")
    try:
        raw = cbor2.loads(data)
    except Exception as e:  # cbor2 raises several types for garbage
        raise WireError(f"not CBOR: {e}") from None
    m = a_map(raw, what)
    version = integer(m.get("v"), "v")
    if version != PROTOCOL:
        raise WireError(f"protocol version {version}, expected {PROTOCOL}")
    return m


def a_map(raw: object, what: str) -> dict[Any, Any]:
    if not isinstance(raw, dict):
        raise WireError(f"{what} must be a map")
    if len(raw) > MAX_ITEMS:
        raise WireError(f"{what} has {len(raw)} entries, more than {MAX_ITEMS}")
    return raw


def a_list(raw: object, what: str) -> list[Any]:
    if not isinstance(raw, list):
        raise WireError(f"{what} must be a list")
    if len(raw) > MAX_ITEMS:
        raise WireError(f"{what} has {len(raw)} items, more than {MAX_ITEMS}")
    return raw


def text(raw: object, what: str, empty: bool = False) -> str:
    if not isinstance(raw, str) or (not raw and not empty) or len(raw) > 256:
        raise WireError(f"{what} must be a non-empty string of at most 256 characters")
    return raw


def integer(raw: object, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer in [low, high)."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw < high:
        raise WireError(f"{what} must be an integer in [{low}, {high})")
    return raw


def number(raw: object, what: str, high: float, low: float = 0.0, positive: bool = False) -> float:
    """A number in [low, high], or (0, high] when `positive`."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise WireError(f"{what} must be a number")
    value = float(raw)
    if not math.isfinite(value) or not low <= value <= high or (positive and value == 0):
        bounds = f"(0, {high:g}]" if positive else f"[{low:g}, {high:g}]"
        raise WireError(f"{what} must be a finite number in {bounds}")
    return value


def address(raw: object, what: str) -> str:
    addr = text(raw, what)
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WireError(f"{what} must be host:port, got {addr!r}")
    return addr


def loopback(host: str) -> bool:
    """Whether `host` (an address, or the name "localhost") is this machine's loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def on_loopback(addr: str) -> bool:
    """Whether the peer at `addr` (host:port) is reached over this machine's loopback."""
    return loopback(addr.rpartition(":")[0])


def boolean(raw: object, what: str) -> bool:
    if not isinstance(raw, bool):
        raise WireError(f"{what} must be a boolean")
    return raw
