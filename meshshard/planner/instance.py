"""The planner's input (units, devices, links, a source) as in DESIGN.md, validated at the edge."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshshard.errors import MeshShardError


class InstanceError(MeshShardError):
    """A malformed or impossible planner instance."""


@dataclass(frozen=True)
class Unit:
    name: str
    mem: float  # bytes of weights (and cache) the unit needs on its device
    out_bytes: float  # size of the activation it sends on


@dataclass(frozen=True)
class Device:
    name: str
    mem: float  # usable bytes
    ms: tuple[float, ...]  # compute time of each unit on this device
    kind: str = ""  # what it is, for people ("cuda:0 bfloat16", "cpu float32"); not planned on
    role: str = ""  # "cloud": the paper's cloud server, for its cloud-edge baselines


@dataclass(frozen=True)
class Link:
    mbps: float
    ms: float  # per-message latency

    def hop_ms(self, nbytes: float) -> float:
        """A message's time from send to arrival: its delay, then its bytes at the rate."""
        return self.ms + self.frame_ms(nbytes)

    def frame_ms(self, nbytes: float) -> float:
        """How long a message occupies the link (the delay overlaps the next message)."""
        return nbytes * 8 / (self.mbps * 1000)


@dataclass(frozen=True)
class Instance:
    units: tuple[Unit, ...]
    devices: tuple[Device, ...]
    default_link: Link
    pairs: tuple[tuple[str, str, Link], ...]  # both ways
    source: str
    return_bytes: float = 4.0
    # One way, from the first to the second, over what `pairs` says of the two.
    directed: tuple[tuple[str, str, Link], ...] = ()

    def __post_init__(self) -> None:
        _check_instance(self)
        links: dict[object, Link] = {frozenset((a, b)): link for a, b, link in self.pairs}
        links |= {(a, b): link for a, b, link in self.directed}
        object.__setattr__(self, "_links", links)
        object.__setattr__(self, "_devices", {d.name: d for d in self.devices})

    @property
    def n(self) -> int:
        return len(self.units)

    def device(self, name: str) -> Device:
        try:
            device: Device = self.__dict__["_devices"][name]
        except KeyError:
            raise InstanceError(f"unknown device {name!r}") from None
        return device

    def index(self, name: str) -> int:
        return [d.name for d in self.devices].index(name)

    def link(self, a: str, b: str) -> Link:
        """The link from a to b: its own direction's, else the pair's, else the default."""
        links = self.__dict__["_links"]
        link: Link = links.get((a, b)) or links.get(frozenset((a, b)), self.default_link)
        return link

    def hop_ms(self, a: str, b: str, nbytes: float) -> float:
        """Time to move nbytes from a to b; nothing moves within one device."""
        return 0.0 if a == b else self.link(a, b).hop_ms(nbytes)

    def frame_ms(self, a: str, b: str, nbytes: float) -> float:
        """How long moving nbytes from a to b keeps the link busy."""
        return 0.0 if a == b else self.link(a, b).frame_ms(nbytes)

    def cloud(self) -> Device:
        """The paper's cloud server: the device marked `"role": "cloud"`, else the fastest
        (the least time for the whole model) other than the source."""
        marked = [d for d in self.devices if d.role == "cloud"]
        if marked:
            return marked[0]
        others = [d for d in self.devices if d.name != self.source] or list(self.devices)
        return min(others, key=lambda d: (sum(d.ms), d.name))

    def to_json(self) -> dict[str, Any]:
        links: dict[str, Any] = {
            "default": {"mbps": self.default_link.mbps, "ms": self.default_link.ms},
            "pairs": [{"a": a, "b": b, "mbps": k.mbps, "ms": k.ms} for a, b, k in self.pairs],
        }
        if self.directed:
            links["directed"] = [
                {"from": a, "to": b, "mbps": k.mbps, "ms": k.ms} for a, b, k in self.directed
            ]
        return {
            "units": [{"name": u.name, "mem": u.mem, "out_bytes": u.out_bytes} for u in self.units],
            "devices": [_device_json(d) for d in self.devices],
            "links": links,
            "source": self.source,
            "return_bytes": self.return_bytes,
        }


def _device_json(d: Device) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d.name, "mem": d.mem, "ms": list(d.ms)}
    return out | ({"kind": d.kind} if d.kind else {}) | ({"role": d.role} if d.role else {})


def load_instance(path: str | Path) -> Instance:
    """Read a JSON or TOML instance file; any problem is one InstanceError line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InstanceError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise InstanceError(f"{path.name} is not valid {kind}: {e}") from None
    if isinstance(data, dict) and "hosts" in data and "units" not in data:
        raise InstanceError(
            f"{path.name} is a testbed (run it with tools/testbed.py), not an instance"
        )
    return parse_instance(data)


def parse_instance(data: Any) -> Instance:
    obj = _mapping(data, "instance")
    units = tuple(_unit(u, i) for i, u in enumerate(_list(obj.get("units"), "units")))
    devices = tuple(_device(d, i) for i, d in enumerate(_list(obj.get("devices"), "devices")))
    links = _mapping(obj.get("links", {}), "links")
    default = _link(links.get("default", {"mbps": 1000.0, "ms": 0.0}), "links.default")
    pairs = _named_links(links, "pairs", ("a", "b"))
    directed = _named_links(links, "directed", ("from", "to"))
    source = _str(obj.get("source"), "source")
    return_bytes = _number(obj.get("return_bytes", 4), "return_bytes")
    return Instance(units, devices, default, pairs, source, return_bytes, directed)


def _named_links(
    links: dict[str, Any], key: str, ends: tuple[str, str]
) -> tuple[tuple[str, str, Link], ...]:
    """links[key]: a list of links, each naming its two ends under `ends`."""
    out = []
    for i, p in enumerate(_list(links.get(key, []), f"links.{key}", allow_empty=True)):
        what = f"links.{key}[{i}]"
        pm = _mapping(p, what)
        a, b = (_str(pm.get(end), f"{what}.{end}") for end in ends)
        out.append((a, b, _link(pm, what)))
    return tuple(out)


def _check_instance(inst: Instance) -> None:
    if not inst.units:
        raise InstanceError("instance has no units")
    if not inst.devices:
        raise InstanceError("instance has no devices")
    names = [d.name for d in inst.devices]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InstanceError(f"device {dup!r} is listed twice")
    for d in inst.devices:
        if len(d.ms) != len(inst.units):
            raise InstanceError(
                f"device {d.name!r} has {len(d.ms)} compute times for {len(inst.units)} units"
            )
    if inst.source not in names:
        raise InstanceError(f"unknown source {inst.source!r} (devices: {', '.join(names[:5])})")
    for a, b, _ in (*inst.pairs, *inst.directed):
        for end in (a, b):
            if end not in names:
                raise InstanceError(f"link names unknown device {end!r}")
        if a == b:
            raise InstanceError(f"link from {a!r} to itself")


def _mapping(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise InstanceError(f"{what} must be an object")
    return x


def _list(x: Any, what: str, allow_empty: bool = False) -> list[Any]:
    if not isinstance(x, list) or (not x and not allow_empty):
        raise InstanceError(f"{what} must be a non-empty list")
    return x


def _str(x: Any, what: str) -> str:
    if not isinstance(x, str) or not x:
        raise InstanceError(f"{what} must be a non-empty string")
    return x


def _number(x: Any, what: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise InstanceError(f"{what} must be a finite number, got {x!r}")
    if x < 0 or (positive and x == 0):
        raise InstanceError(
            f"{what} must be {'positive' if positive else 'non-negative'}, got {x!r}"
        )
    return float(x)


def _unit(x: Any, i: int) -> Unit:
    m = _mapping(x, f"units[{i}]")
    return Unit(
        name=_str(m.get("name", f"U{i}"), f"units[{i}].name"),
        mem=_number(m.get("mem"), f"units[{i}].mem"),
        out_bytes=_number(m.get("out_bytes", 0), f"units[{i}].out_bytes"),
    )


def _device(x: Any, i: int) -> Device:
    m = _mapping(x, f"devices[{i}]")
    name = _str(m.get("name"), f"devices[{i}].name")
    ms = tuple(
        _number(t, f"devices[{i}].ms[{j}]")
        for j, t in enumerate(_list(m.get("ms"), f"devices[{i}].ms"))
    )
    kind, role = m.get("kind", ""), m.get("role", "")
    if not isinstance(kind, str):
        raise InstanceError(f"devices[{i}].kind must be a string")
    if role not in ("", "cloud"):
        raise InstanceError(f'devices[{i}].role must be "cloud" or absent, got {role!r}')
    return Device(name, _number(m.get("mem"), f"devices[{i}].mem"), ms, kind, role)


def _link(x: Any, what: str) -> Link:
    m = _mapping(x, what)
    return Link(
        mbps=_number(m.get("mbps"), f"{what}.mbps", positive=True),
        ms=_number(m.get("ms", 0), f"{what}.ms"),
    )
