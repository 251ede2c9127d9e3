"""One Config for a MeshShard process; every field can also come from a MESHSHARD_* variable."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshshard.model.device import Placement

DEFAULT_MODEL = "smollm2-135m-instruct"
API_PORT_OFFSET = 1000  # the user API's port, above the peer port (7117 -> 8117)
DTYPES = ("float32", "bfloat16", "float16")


def default_cache_dir() -> Path:
    """MESHSHARD_CACHE, else $XDG_CACHE_HOME/meshshard, else ~/.cache/meshshard."""
    if env := os.environ.get("MESHSHARD_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "meshshard"


@dataclass(frozen=True)
class Timings:
    """Every timeout and interval of a peer, in seconds: LAN is the default; TEST shrinks time
    for tests."""

    # How often each peer probes one other member, and how long it waits for the answer.
    probe_interval: float = 0.25
    probe_timeout: float = 0.2
    # Members asked to probe a silent target on our behalf before we suspect it.
    indirect_probes: int = 3
    # A suspect not heard from in this long is declared dead. Longer than a 1 s stall plus
    # the time a refutation takes to spread, so a busy peer is not declared dead.
    suspicion_timeout: float = 1.6
    # ... shortened down to this as other members confirm the suspicion independently
    # (Lifeguard): a peer everyone finds silent is gone; one only we miss may be our link.
    suspicion_confirmed: float = 1.0
    # Full state exchange with one random member (repairs divergence, heals partitions).
    pushpull_interval: float = 2.0
    # Dead and left members are remembered this long, so stale gossip cannot revive them.
    tombstone_ttl: float = 60.0
    # Each update rides on this many times log2(n+1) messages.
    retransmit_mult: int = 3
    # Most updates piggybacked on one message.
    max_piggyback: int = 16
    # The coordinator waits this long after the last change before replanning.
    replan_debounce: float = 0.5
    # Link bandwidth and RTT to each member are remeasured this often.
    link_interval: float = 30.0
    # An HTTP connection that has not sent a whole request's headers in this long, or sits
    # idle this long between requests, is closed (our clients drop idle ones at half that).
    header_timeout: float = 10.0
    # ... and a request or answer body must arrive whole within this long.
    body_timeout: float = 30.0

    # -- the data plane --
    # An origin waits this long for a token before it gives up on an answer ...
    step_timeout: float = 120.0
    # ... and this long for a ready chain when an answer starts,
    ready_timeout: float = 120.0
    # ... but only this long while the serving members cannot hold the model at all (a
    # moment's view, a profile not yet heard, is not yet a verdict).
    too_small_grace: float = 2.0
    # After a break, an answer waits this long for a newer plan before trying the same again;
    same_plan_grace: float = 3.0
    # ... a stage merely not ready yet needs only this long.
    not_ready_retry: float = 0.2
    # An origin waits this long for KV handoffs before it replays the answer instead.
    handoff_timeout: float = 10.0
    # Stages look this often for caches nobody will ask for again ...
    sweep_interval: float = 2.0
    # ... such as a session with no step for this long (its origin lost track of it),
    session_idle: float = 600.0
    # ... or a cache left behind by a plan change that no new owner asked for in this long.
    left_behind_keep: float = 60.0
    # Opening a data-plane socket gives up after this.
    connect_timeout: float = 5.0
    # A caller refused for want of memory is told to ask again after this (Retry-After).
    busy_retry: float = 2.0
    # Stopping: answers in flight from this peer get this long to finish, ...
    drain_timeout: float = 10.0
    # ... then the mesh this long to plan without us and take our sessions' caches.
    hand_over_timeout: float = 20.0
    # A peer puts its stage's load into its profile this often.
    load_period: float = 2.0


LAN_TIMINGS = Timings()
TEST_TIMINGS = Timings(
    # Shrunk, but with room for peers that load shards on a busy 2-core machine.
    probe_interval=0.1,
    probe_timeout=0.15,
    suspicion_timeout=1.0,
    suspicion_confirmed=0.5,
    pushpull_interval=0.3,
    tombstone_ttl=10.0,
    replan_debounce=0.1,
    link_interval=2.0,
    header_timeout=3.0,
    body_timeout=5.0,
    step_timeout=60.0,
    ready_timeout=60.0,
    too_small_grace=1.0,
    same_plan_grace=2.0,
    not_ready_retry=0.1,
    handoff_timeout=5.0,
    sweep_interval=0.5,
    session_idle=60.0,
    left_behind_keep=10.0,
    load_period=1.0,
)


@dataclass(frozen=True)
class Config:
    # The embedded default, a local Hugging Face folder, or a hub id (where the hub is reachable).
    model: str = DEFAULT_MODEL
    # Where the shard runs: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda[:N] or mps.
    device: str = "auto"
    # Weights and activations; None: the device's default (bfloat16 on CUDA, float16 on MPS,
    # float32 on a CPU, which keeps sharded output exactly equal to the whole model's).
    dtype: str | None = None
    # Weight-only quantization of the decoder layers' linear weights: none, int8, int4 (CUDA).
    quantize: str = "none"
    # Converted models and device profiles live here; safe to delete, rebuilt when needed.
    cache_dir: Path = field(default_factory=default_cache_dir)
    # This peer's id in the mesh; default host-port, unique per daemon on a machine.
    name: str | None = None
    # Peer endpoints (gossip, activations; sealed with the mesh key) listen here.
    port: int = 7117
    # The user API (OpenAI endpoints, status) listens here; None: port + API_PORT_OFFSET.
    api_port: int | None = None
    # ... on this address: loopback unless an API token guards it.
    api_bind: str = "127.0.0.1"
    # Bearer token every API request must carry; None: no token (then loopback only).
    api_token: str | None = None
    # Host names the API answers to besides loopback and its own address (DNS rebinding).
    api_allow_hosts: tuple[str, ...] = ()
    # Open connections each listener accepts from one address, and in all.
    connections_per_host: int = 32
    connections: int = 256
    # The mesh key file (a keyring: the first key seals, all open); None only with insecure.
    secret_file: Path | None = None
    # Run with no mesh key: anyone on the network can join, inject and read. Explicit only.
    insecure: bool = False
    # The mesh's name, bound into every sealed message: two meshes never cross-talk.
    mesh: str = "meshshard"
    # Port of the raw links that carry decode steps (chain/rawlinks.py); 0: any free one,
    # -1: none (WebSockets only). With `announce`, 0 means none: a relay or port forward
    # would not pass it.
    raw_port: int = 0
    # Largest data-plane frame accepted; checked before the frame is read.
    max_frame_bytes: int = 64 * 1024 * 1024
    # Address to bind and announce on; mDNS is sent on this interface only. None: all.
    interface: str | None = None
    # host:port other peers reach this one at, where that is not interface:port (a port
    # forward, a relay); None: interface:port.
    announce: str | None = None
    # Static seeds (host:port), for networks where multicast is blocked.
    peers: tuple[str, ...] = ()
    # A higher priority makes a peer the coordinator (ties: the higher id).
    priority: int = 0
    # Bytes this peer offers for weights and caches; None: what its device has (free VRAM
    # less a reserve on CUDA, 80% of available memory on a CPU or MPS).
    memory: float | None = None
    # What the coordinator's planner minimises: "latency" or "throughput".
    objective: str = "latency"
    # Tokens of KV cache planned per unit, so a plan leaves room for a long answer.
    context_tokens: int = 2048
    # Announce and browse with mDNS; off leaves only --peer seeds.
    mdns: bool = True
    # Where this device's measured profile is kept; None: cache_dir/profiles. A peer whose
    # compute is limited in ways the profile key cannot see (a cgroup quota inside a network
    # namespace) gets a folder of its own.
    profile_dir: Path | None = None
    # Control-plane timeouts: LAN_TIMINGS, or TEST_TIMINGS to make tests fast.
    timings: Timings = LAN_TIMINGS
    # Most tokens an answer started here drafts per pass for the chain to verify (speculative
    # decoding by prompt lookup, adapted per answer); 0 turns it off.
    speculate: int = 8

    @property
    def profile_folder(self) -> Path:
        return self.profile_dir or self.cache_dir / "profiles"

    @property
    def api_port_or_default(self) -> int:
        return self.api_port if self.api_port is not None else self.port + API_PORT_OFFSET

    def node_id(self) -> str:
        return self.name or f"{socket.gethostname()}-{self.port}"

    def placement(self) -> Placement:
        """Where and how this process runs a shard (asks torch what the machine has)."""
        from meshshard.model.device import place

        return place(self.device, self.dtype, self.quantize)


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> float:
    """'256MB', '1.5GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 256MB or 2GiB)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]
