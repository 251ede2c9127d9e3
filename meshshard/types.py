"""The shared vocabulary, at the bottom of the package (it imports nothing of ours): ids,
epochs, members, profiles and plans, as typed, frozen records both planes pass around and
the wire carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NewType

NodeId = NewType("NodeId", str)
SessionId = NewType("SessionId", str)  # one answer, unique across the mesh and restarts


class State(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    @property
    def live(self) -> bool:
        """Still part of the mesh (a suspect may yet refute)."""
        return self in (State.ALIVE, State.SUSPECT)


@dataclass(frozen=True, order=True)
class Epoch:
    """A plan's epoch: (term, coordinator), compared in that order."""

    term: int
    coordinator: str

    def __str__(self) -> str:
        return f"{self.term}/{self.coordinator}"


ZERO_EPOCH = Epoch(0, "")


@dataclass(frozen=True)
class Member:
    """What every peer knows of one member; small enough to piggyback on every probe."""

    id: NodeId
    addr: str  # host:port of its peer endpoint
    incarnation: int
    state: State
    priority: int = 0
    profile_version: int = 0
    # The plan epoch whose shard this member has loaded and serves (data plane readiness).
    ready: Epoch = ZERO_EPOCH
    # Leaving gracefully: still serving, but no longer elected or given units in new plans.
    draining: bool = False
    # In a SUSPECT record: the member that suspects it (independent accusers shorten the
    # suspicion, Lifeguard's confirmations).
    accuser: NodeId | None = None

    @property
    def serving(self) -> bool:
        """Live and not leaving: a candidate for coordinator and for plans."""
        return self.state.live and not self.draining


@dataclass(frozen=True)
class LinkStat:
    mbps: float
    rtt_ms: float


@dataclass(frozen=True)
class Profile:
    """A member's capabilities; large, so it travels by push/pull, not on every probe."""

    id: NodeId
    version: int
    model: str
    mem: float  # bytes offered to the mesh
    unit_ms: tuple[float, ...]  # decode time per unit, measured or estimated
    measured: bool  # False while unit_ms is only an estimate
    # One step of several sessions at once: per size in planner.flow.BATCHES, per unit;
    # empty while only estimated.
    batch_ms: tuple[tuple[float, ...], ...] = ()
    links: dict[NodeId, LinkStat] = field(default_factory=dict)  # measured to other members
    # What its stage is doing now (for operators; the DP does not read these).
    load: float = 0.0  # sessions its stage holds
    step_ms: float = 0.0  # recent mean time of its stage's forward steps
    used: float = 0.0  # bytes of weights and KV caches held
    # A step's cost beyond the forward pass, as measured serving, and a pass's own part of
    # it, shared by the pass's rows (chain/meter.py StepCostMeter).
    overhead_ms: float = 0.0
    pass_overhead_ms: float = 0.0
    # Its stage's decode passes of one row as measured serving over what unit_ms says for
    # them, and of several rows over what batch_ms says (1.0: none of that kind ran yet): a
    # profile is kept for days, the host's speed moves within an hour, and not evenly over a
    # pass's sizes; a lone answer's passes, the only ones before a burst, run on the event
    # loop, a burst's beside it on the model thread (docs/testbed.md, after run 59).
    pace: float = 1.0
    batch_pace: float = 1.0
    device: str = ""  # where it runs its shard, as people read it: "cuda:0 bfloat16 int8"
    # The largest data-plane frame it takes (--max-frame): others cut theirs to fit. 0: not said.
    frame: int = 0
    # The port of its raw links for decode steps (chain/rawlinks.py). 0: WebSockets only.
    raw: int = 0


@dataclass(frozen=True)
class PlanStage:
    device: NodeId
    start: int
    end: int


@dataclass(frozen=True)
class Fallback:
    """The stages a plan gives way to if the member `lost` is lost (see mesh/fallbacks.py)."""

    lost: NodeId
    stages: tuple[PlanStage, ...]


@dataclass(frozen=True)
class PlanRecord:
    """A published plan: which member runs which units, fenced by its epoch."""

    epoch: Epoch
    model: str
    objective: str
    stages: tuple[PlanStage, ...]
    latency_ms: float
    bottleneck_ms: float
    reason: str = ""  # why this plan was made ("peer-c joined", "peer-b died")
    # Why each member not in the plan was left out, in words an operator can act on.
    left_out: tuple[tuple[NodeId, str], ...] = ()
    # For each stage's member, what this plan gives way to without it (precomputed).
    fallbacks: tuple[Fallback, ...] = ()
    # Waves the chain's decoding sessions spread over (chain/waves.py), the flow model's
    # fastest for the plan's stages (planner/flow.py best_waves): for the answers in flight
    # its throughput is for; and by how many are decoding, 1, 2, ... (the last count for any
    # more; none: `waves` for any count).
    waves: int = 1
    waves_by: tuple[int, ...] = ()
    # The share of a tied head's vocabulary the first stage scores for a lone answer's step
    # (planner/headsplit.py); 0: the last stage scores it all.
    head_share: float = 0.0
    # Whether a one-wave chain's last stage sends a whole wave's normed hidden states for the
    # first stage to score all of the tied head in one product (planner/headsplit.py).
    wave_head: bool = False

    @property
    def wave_counts(self) -> tuple[int, ...]:
        """The waves by answers decoding, 1, 2, ... (the last for any more)."""
        return self.waves_by or (self.waves,)

    def stage_of(self, node: NodeId) -> PlanStage | None:
        return next((s for s in self.stages if s.device == node), None)

    def fallback(self, lost: NodeId) -> Fallback | None:
        return next((f for f in self.fallbacks if f.lost == lost), None)


@dataclass(frozen=True)
class UnitCost:
    """What one planning unit of a model costs: its weights, the KV cache and the activation
    it adds per token. The model measures it; the planner reads it."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    out_bytes_per_token: int
