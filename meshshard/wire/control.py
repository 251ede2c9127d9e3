"""Control-plane messages (gossip): typed, frozen, and their CBOR form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from meshshard.types import (
    Fallback,
    LinkStat,
    Member,
    NodeId,
    PlanRecord,
    PlanStage,
    Profile,
    State,
)
from meshshard.wire import checks
from meshshard.wire.checks import (
    MAX_CONTROL_BYTES,
    MAX_COUNT,
    MAX_FRAME_LIMIT,
    MAX_INCARNATION,
    MAX_LOAD,
    MAX_MBPS,
    MAX_MEMORY,
    MAX_MS,
    MAX_PACE,
    MAX_VERSION,
    MIN_MBPS,
    MIN_PACE,
    PROTOCOL,
    WireError,
)


@dataclass(frozen=True)
class Ping:
    sender: Member
    updates: tuple[Member, ...]
    plan: PlanRecord | None


@dataclass(frozen=True)
class Ack:
    sender: Member
    updates: tuple[Member, ...]
    plan: PlanRecord | None


@dataclass(frozen=True)
class PingReq:
    sender: Member
    target: NodeId
    target_addr: str
    updates: tuple[Member, ...]


@dataclass(frozen=True)
class Nack:
    sender: Member
    target: NodeId


@dataclass(frozen=True)
class Sync:
    sender: Member
    members: tuple[Member, ...]
    profiles: tuple[Profile, ...]
    plan: PlanRecord | None


ControlMessage = Ping | Ack | PingReq | Nack | Sync


def encode(msg: ControlMessage) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL, "sender": _member_out(msg.sender)}
    match msg:
        case Ping(updates=updates, plan=plan):
            body |= {
                "k": "ping",
                "updates": [_member_out(m) for m in updates],
                "plan": _plan_out(plan),
            }
        case Ack(updates=updates, plan=plan):
            body |= {
                "k": "ack",
                "updates": [_member_out(m) for m in updates],
                "plan": _plan_out(plan),
            }
        case PingReq(target=target, target_addr=addr, updates=updates):
            body |= {
                "k": "ping-req",
                "target": target,
                "addr": addr,
                "updates": [_member_out(m) for m in updates],
            }
        case Nack(target=target):
            body |= {"k": "nack", "target": target}
        case Sync(members=members, profiles=profiles, plan=plan):
            body |= {
                "k": "sync",
                "members": [_member_out(m) for m in members],
                "profiles": [_profile_out(p) for p in profiles],
                "plan": _plan_out(plan),
            }
    return bytes(cbor2.dumps(body))


def decode(data: bytes) -> ControlMessage:
    m = checks.load(data, MAX_CONTROL_BYTES, "message")
    sender = _member_in(m.get("sender"), "sender")
    kind = m.get("k")
    match kind:
        case "ping":
            return Ping(sender, _members(m.get("updates"), "updates"), _plan_in(m.get("plan")))
        case "ack":
            return Ack(sender, _members(m.get("updates"), "updates"), _plan_in(m.get("plan")))
        case "ping-req":
            return PingReq(
                sender,
                NodeId(checks.text(m.get("target"), "target")),
                checks.address(m.get("addr"), "addr"),
                _members(m.get("updates"), "updates"),
            )
        case "nack":
            return Nack(sender, NodeId(checks.text(m.get("target"), "target")))
        case "sync":
            profiles = tuple(
                _profile_in(p, f"profiles[{i}]")
                for i, p in enumerate(checks.a_list(m.get("profiles"), "profiles"))
            )
            return Sync(
                sender, _members(m.get("members"), "members"), profiles, _plan_in(m.get("plan"))
            )
    raise WireError(f"unknown message kind {kind!r}")


def _member_out(m: Member) -> dict[str, Any]:
    return {
        "id": m.id,
        "addr": m.addr,
        "inc": m.incarnation,
        "state": m.state.value,
        "prio": m.priority,
        "pv": m.profile_version,
        "ready": [m.ready.term, m.ready.coordinator],
        "drain": m.draining,
        "by": m.accuser,
    }


def _member_in(raw: object, what: str) -> Member:
    m = checks.a_map(raw, what)
    state = checks.text(m.get("state"), f"{what}.state")
    try:
        parsed = State(state)
    except ValueError:
        raise WireError(f"{what}.state: unknown state {state!r}") from None
    return Member(
        id=NodeId(checks.text(m.get("id"), f"{what}.id")),
        addr=checks.address(m.get("addr"), f"{what}.addr"),
        incarnation=checks.integer(m.get("inc"), f"{what}.inc", high=MAX_INCARNATION),
        state=parsed,
        priority=checks.integer(m.get("prio"), f"{what}.prio", low=-(2**31), high=2**31),
        profile_version=checks.integer(m.get("pv"), f"{what}.pv", high=MAX_VERSION),
        ready=checks.epoch(m.get("ready")),
        draining=checks.boolean(m.get("drain"), f"{what}.drain"),
        accuser=_accuser(m.get("by"), parsed, what),
    )


def _accuser(raw: object, state: State, what: str) -> NodeId | None:
    if raw is None:
        return None
    if state != State.SUSPECT:
        raise WireError(f"{what}.by: only a suspect has an accuser")
    return NodeId(checks.text(raw, f"{what}.by"))


def _members(raw: object, what: str) -> tuple[Member, ...]:
    return tuple(_member_in(x, f"{what}[{i}]") for i, x in enumerate(checks.a_list(raw, what)))


def _profile_out(p: Profile) -> dict[str, Any]:
    return {
        "id": p.id,
        "ver": p.version,
        "model": p.model,
        "mem": p.mem,
        "ms": list(p.unit_ms),
        "bms": [list(units) for units in p.batch_ms],
        "measured": p.measured,
        "links": {k: [s.mbps, s.rtt_ms] for k, s in p.links.items()},
        "load": p.load,
        "step": p.step_ms,
        "used": p.used,
        "ovh": p.overhead_ms,
        "ovp": p.pass_overhead_ms,
        "pace": p.pace,
        "bpace": p.batch_pace,
        "dev": p.device,
        "frame": p.frame,
        "raw": p.raw,
    }


def _profile_in(raw: object, what: str) -> Profile:
    m = checks.a_map(raw, what)
    links = {}
    for peer, stat in checks.a_map(m.get("links"), f"{what}.links").items():
        pair = checks.a_list(stat, f"{what}.links")
        if len(pair) != 2:
            raise WireError(f"{what}.links[{peer!r}] must be [mbps, rtt_ms]")
        links[NodeId(checks.text(peer, f"{what}.links key"))] = LinkStat(
            checks.number(pair[0], f"{what}.links.mbps", MAX_MBPS, low=MIN_MBPS),
            checks.number(pair[1], f"{what}.links.rtt", MAX_MS),
        )
    measured = m.get("measured")
    if not isinstance(measured, bool):
        raise WireError(f"{what}.measured must be a boolean")
    return Profile(
        id=NodeId(checks.text(m.get("id"), f"{what}.id")),
        version=checks.integer(m.get("ver"), f"{what}.ver", high=MAX_VERSION),
        model=checks.text(m.get("model"), f"{what}.model"),
        mem=checks.number(m.get("mem"), f"{what}.mem", MAX_MEMORY),
        unit_ms=tuple(
            checks.number(x, f"{what}.ms", MAX_MS) for x in checks.a_list(m.get("ms"), f"{what}.ms")
        ),
        measured=measured,
        batch_ms=tuple(
            tuple(
                checks.number(x, f"{what}.bms", MAX_MS) for x in checks.a_list(units, f"{what}.bms")
            )
            for units in checks.a_list(m.get("bms", []), f"{what}.bms")
        ),
        links=links,
        load=checks.number(m.get("load"), f"{what}.load", MAX_LOAD),
        step_ms=checks.number(m.get("step", 0.0), f"{what}.step", MAX_MS),
        used=checks.number(m.get("used", 0.0), f"{what}.used", MAX_MEMORY),
        overhead_ms=checks.number(m.get("ovh", 0.0), f"{what}.ovh", MAX_MS),
        pass_overhead_ms=checks.number(m.get("ovp", 0.0), f"{what}.ovp", MAX_MS),
        pace=checks.number(m.get("pace", 1.0), f"{what}.pace", MAX_PACE, low=MIN_PACE),
        batch_pace=checks.number(m.get("bpace", 1.0), f"{what}.bpace", MAX_PACE, low=MIN_PACE),
        device=checks.text(m.get("dev", ""), f"{what}.dev", empty=True),
        frame=checks.integer(m.get("frame", 0), f"{what}.frame", high=MAX_FRAME_LIMIT),
        raw=checks.integer(m.get("raw", 0), f"{what}.raw", high=65535),
    )


def _plan_out(p: PlanRecord | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "epoch": [p.epoch.term, p.epoch.coordinator],
        "model": p.model,
        "objective": p.objective,
        "stages": _stages_out(p.stages),
        "latency_ms": p.latency_ms,
        "bottleneck_ms": p.bottleneck_ms,
        "reason": p.reason,
        "left_out": [[node, why] for node, why in p.left_out],
        "fallbacks": [[f.lost, _stages_out(f.stages)] for f in p.fallbacks],
        "waves": p.waves,
        "waves_by": list(p.waves_by),
        "head": p.head_share,
        "wave_head": p.wave_head,
    }


def _stages_out(stages: tuple[PlanStage, ...]) -> list[list[Any]]:
    return [[s.device, s.start, s.end] for s in stages]


def _plan_in(raw: object) -> PlanRecord | None:
    if raw is None:
        return None
    m = checks.a_map(raw, "plan")
    stages = _stages_in(m.get("stages"), "plan.stages")
    fallbacks = checks.a_list(m.get("fallbacks", []), "plan.fallbacks")
    if len(fallbacks) > len(stages):
        raise WireError("plan.fallbacks: more than one per stage")
    return PlanRecord(
        epoch=checks.epoch(m.get("epoch")),
        model=checks.text(m.get("model"), "plan.model"),
        objective=checks.text(m.get("objective"), "plan.objective"),
        stages=tuple(stages),
        latency_ms=checks.number(m.get("latency_ms"), "plan.latency_ms", MAX_MS),
        bottleneck_ms=checks.number(m.get("bottleneck_ms"), "plan.bottleneck_ms", MAX_MS),
        reason=checks.text(m.get("reason"), "plan.reason", empty=True),
        left_out=tuple(
            _left_out(x, i)
            for i, x in enumerate(checks.a_list(m.get("left_out", []), "plan.left_out"))
        ),
        fallbacks=tuple(_fallback(x, i) for i, x in enumerate(fallbacks)),
        waves=checks.integer(m.get("waves", 1), "plan.waves", 1, len(stages) + 1),
        waves_by=tuple(
            checks.integer(x, "plan.waves_by", 1, len(stages) + 1)
            for x in checks.a_list(m.get("waves_by", []), "plan.waves_by")
        ),
        head_share=checks.number(m.get("head", 0.0), "plan.head", 1.0),
        wave_head=checks.boolean(m.get("wave_head", False), "plan.wave_head"),
    )


def _stages_in(raw: object, what: str) -> tuple[PlanStage, ...]:
    stages = []
    end = 0
    for i, s in enumerate(checks.a_list(raw, what)):
        triple = checks.a_list(s, f"{what}[{i}]")
        if len(triple) != 3:
            raise WireError(f"{what}[{i}] must be [device, start, end]")
        stage = PlanStage(
            NodeId(checks.text(triple[0], f"{what}.device")),
            checks.integer(triple[1], f"{what}.start", high=MAX_COUNT),
            checks.integer(triple[2], f"{what}.end", high=MAX_COUNT),
        )
        if stage.start != end or stage.end <= stage.start:
            raise WireError(f"{what}[{i}] does not continue the chain")
        end = stage.end
        stages.append(stage)
    if not stages:
        raise WireError(f"{what}: no stages")
    return tuple(stages)


def _fallback(raw: object, i: int) -> Fallback:
    pair = checks.a_list(raw, f"plan.fallbacks[{i}]")
    if len(pair) != 2:
        raise WireError(f"plan.fallbacks[{i}] must be [lost member, stages]")
    lost = NodeId(checks.text(pair[0], "plan.fallbacks.lost"))
    return Fallback(lost, _stages_in(pair[1], f"plan.fallbacks[{i}].stages"))


def _left_out(raw: object, i: int) -> tuple[NodeId, str]:
    pair = checks.a_list(raw, f"plan.left_out[{i}]")
    if len(pair) != 2:
        raise WireError(f"plan.left_out[{i}] must be [node, reason]")
    return NodeId(checks.text(pair[0], "plan.left_out.node")), checks.text(
        pair[1], "plan.left_out.reason"
    )
