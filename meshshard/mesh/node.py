"""The control plane of one peer: the asyncio driver around the pure membership, election,
plan book and replanner. It talks only through a Transport, so a test can run many nodes
over an in-memory network that drops, delays and partitions.

Longer than our usual module, for a reason: it is the one owner of the node's state and the
one place where the pure decisions beside it (membership, election, decide, sanity, seeds,
estimates, coordinator) meet time and I/O: its loops, what it hears, and operator plans.
What it says of the mesh is in report.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from meshshard.clock import Clock, LoopClock, Pulse
from meshshard.config import Timings
from meshshard.events import EventLog
from meshshard.mesh.coordinator import (
    Replanner,
    make_plan,
    mesh_instance,
    plan_record,
    signature,
)
from meshshard.mesh.decide import Keep, View, decide, worth_publishing
from meshshard.mesh.election import PlanBook, elect
from meshshard.mesh.estimates import LinkEstimates, material
from meshshard.mesh.fallbacks import outdated, standing, with_fallbacks
from meshshard.mesh.membership import Change, Membership
from meshshard.mesh.report import plan_head_share, plan_waves
from meshshard.mesh.sanity import member_problem, plan_problem, profile_problem
from meshshard.mesh.seeds import Seeds
from meshshard.planner import Instance, InstanceError, Objective, Stage, evaluate
from meshshard.planner.baselines import baseline
from meshshard.planner.cost import SESSIONS, per_token_ms
from meshshard.rounds import rounds
from meshshard.types import Epoch, LinkStat, Member, NodeId, PlanRecord, Profile, State, UnitCost
from meshshard.wire import Ack, ControlMessage, Nack, Ping, PingReq, Sync

logger = logging.getLogger(__name__)

# A valid plan is replaced only by one predicted better by this fraction.
REPLAN_GAIN = 0.10
DEAD_GOSSIP = 0.25  # the share of push/pulls sent to a member we think dead


class TransportError(Exception):
    """The other side did not answer in time, or not sensibly. `refused`: nothing listens
    at the address (the host answered for it), which is what a crashed process leaves."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class Transport(Protocol):
    async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage: ...

    async def measure(self, addr: str, timeout: float) -> LinkStat: ...


MEASURE_TIMEOUT = 5.0  # seconds for one link measurement (a 10 Mbit/s link takes ~0.3)


class PlanRefused(Exception):
    """An operator's plan that cannot be applied, with the reason."""


class ControlNode:
    def __init__(
        self,
        *,
        me: Member,
        profile: Profile,
        units: Sequence[UnitCost],
        timings: Timings,
        transport: Transport,
        clock: Clock | None = None,
        objective: Objective = "latency",
        context_tokens: int = 2048,
        rng: random.Random | None = None,
        on_plan: Callable[[PlanRecord], None] | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.clock = clock or LoopClock()
        self.timings = timings
        self.transport = transport
        self.units = list(units)
        self.model = profile.model
        self.objective: Objective = objective
        self.context_tokens = context_tokens
        self.rng = rng or random.Random()
        self.membership = Membership(me, timings, self.clock.now(), self.rng)
        self.book = PlanBook()
        self.replanner = Replanner(timings.replan_debounce)
        self.profiles: dict[NodeId, Profile] = {me.id: profile}
        self.events = events or EventLog(me.id)
        self.plan_error = ""
        self.on_plan = on_plan
        self._fetch: asyncio.Queue[str] = asyncio.Queue(maxsize=256)  # members' new profiles
        self._fetching: set[str] = set()  # ... queued, each once
        self._seeds = Seeds()
        self._seeds_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._leaving = False
        self._guessed = False  # the plan in force was made on estimated profiles
        self._pinned: tuple[NodeId, ...] | None = None  # members an operator's plan was made for
        self.excluded: frozenset[str] = frozenset()  # members an operator keeps out of plans
        self.refused: Counter[str] = Counter()  # gossip not believed, by kind
        self.pulse = Pulse()  # fires when members, their readiness or the plan change
        self._notified: tuple[int, PlanRecord | None] = (-1, None)
        self.loop_errors: Counter[str] = Counter()  # rounds of our loops that failed
        self._links = LinkEstimates()
        self._link_wait = min(1.0, timings.link_interval)
        self._unplannable: tuple[object, str] = (None, "")  # (what it was worked out on, why)
        self._evidence: asyncio.Queue[str] = asyncio.Queue(maxsize=64)  # links the data plane lost
        self._evidence_queued: set[str] = set()
        self._heard: dict[NodeId, float] = {}  # when the data plane last had a frame from each
        self._coordinated = 0  # the pulse's version when the coordinator last looked
        self._push_soon = asyncio.Event()  # our record changed in a way others wait for

    @property
    def id(self) -> NodeId:
        return self.membership.me.id

    @property
    def coordinator(self) -> NodeId | None:
        return elect(self.membership.members())

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.events.add("peer", f"started as {self.membership.me.addr}")
        loops = {
            "probe": self._probe_round,
            "sync": self._sync_round,
            "introduce": self._introduce_round,
            "coordinate": self._coordinate_round,
            "links": self._link_round,
            "confirm": self._confirm_round,
            "push": self._push_round,
        }
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(rounds(name, body, self.loop_errors, self.clock.sleep))
                for name, body in loops.items()
            ]
            await self._stop.wait()
            for task in tasks:
                task.cancel()

    async def stop(self, leave: bool = True) -> None:
        """Say goodbye (a LEFT record pushed to everyone), then stop every loop."""
        if leave and not self._leaving:
            self._leaving = True
            self.membership.leave()
            self.events.add("peer", "leaving the mesh")
            await self._push_all(self.timings.probe_timeout * 4)
        self._stop.set()

    async def drain(self) -> None:
        """Announce a graceful leave to come: the mesh plans without us while we still
        serve, so our units (and their KV caches) can move before we go."""
        if not self.membership.me.draining:
            self.membership.drain()
            self._notify()
            self.events.add("peer", "draining: plans move off this peer")
            await self._push_all(self.timings.probe_timeout * 4)

    def preview(
        self,
        method: str = "planner",
        objective: Objective | None = None,
        exclude: Sequence[str] = (),
    ) -> PlanRecord:
        """The plan `method` would make now on the serving members less `exclude`, without
        applying it (any peer can preview; the source is the coordinator). PlanRefused when
        there is none."""
        source = self.coordinator
        if source is None:
            raise PlanRefused("no coordinator yet")
        if source in exclude:
            raise PlanRefused(f"{source} is where requests start (the coordinator): it stays in")
        members = [m for m in self.membership.members() if m.id not in exclude]
        objective = objective or self.objective
        try:
            inst = mesh_instance(
                members, self.profiles, self.units, self.model, source, self.context_tokens
            )
            if method == "planner":
                plan = make_plan(inst, objective, source, self.model, "")
            else:
                stages, cost = baseline(inst, method, objective)
                plan = plan_record(stages, cost, objective, source, self.model, "")
        except InstanceError as e:
            raise PlanRefused(f"{method}: {e}") from None
        if len({s.device for s in plan.stages}) != len(plan.stages):
            raise PlanRefused(f"{method}: its plan visits a device twice, which a chain cannot")
        return plan

    async def apply(
        self, method: str, objective: Objective | None = None, exclude: Sequence[str] = ()
    ) -> PlanRecord:
        """Operator: put `method`'s plan in force now ("planner", or a baseline such as
        "even"), made on the live members less `exclude`. A baseline's plan stands until the
        members change; the planner's objective and exclusions stand from now on. Coordinator
        only; PlanRefused when the plan cannot run."""
        if self.coordinator != self.id:
            raise PlanRefused(f"only the coordinator ({self.coordinator}) applies plans")
        plan = self.preview(method, objective, exclude)
        if method == "planner":
            self.objective = objective or self.objective
            self.excluded = frozenset(exclude)
        sig = signature(self._plannable(), self.profiles, self.model)
        what = method if method != "planner" else f"planner ({self.objective})"
        if exclude:
            what += f" without {', '.join(sorted(exclude))}"
        plan = with_fallbacks(
            plan, self._plannable(), self.profiles, self.units, self.context_tokens
        )
        epoch = self.book.next_epoch(self.id, self.clock.wall())
        plan = self._shaped(plan, epoch, f"operator: {what}")
        self._pinned = sig.members if method != "planner" else None
        self.replanner.done(sig)
        self._adopt(plan)
        await self._push_all(self.timings.probe_timeout * 4)
        return plan

    def _unwell(self, plan: PlanRecord, serving: set[NodeId]) -> str:
        """The plan's stages that are gone or suspected, in words ("peer-b gone")."""
        out = []
        for stage in plan.stages:
            member = self.membership.get(stage.device)
            if member is not None and member.draining and member.state.live:
                out.append(f"{stage.device} leaving")
            elif stage.device not in serving:
                out.append(f"{stage.device} gone")
            elif member is not None and member.state == State.SUSPECT:
                out.append(f"{stage.device} suspect")
        return ", ".join(out)

    def _plannable(self) -> list[Member]:
        """Members the coordinator may plan with: all but those an operator excluded."""
        return [m for m in self.membership.members() if m.id not in self.excluded]

    def why_unplannable(self) -> str:
        """Why the serving members (as we know them, the draining ones left out) cannot run
        the model now, in the planner's words; "" when they can. A leaving peer need not wait
        for a plan that cannot exist, nor a caller for an answer that cannot come."""
        members = self.membership.members()
        versions = tuple(sorted((n, p.version) for n, p in self.profiles.items()))
        key = (self.membership.version, versions)
        if self._unplannable[0] == key:
            return self._unplannable[1]
        source = elect(members)
        why = "no member can coordinate yet" if source is None else ""
        if source is not None:
            try:
                inst = mesh_instance(
                    members, self.profiles, self.units, self.model, source, self.context_tokens
                )
                make_plan(inst, self.objective, source, self.model, "")
            except InstanceError as e:
                why = str(e)
        self._unplannable = (key, why)
        return why

    def join(self, addr: str, configured: bool = False) -> None:
        """An address from discovery, or a seed given by hand (`configured`): exchange state
        with it at once, and retry a while until it answers (a lost first message must not
        leave a peer alone); see Seeds for how long."""
        members = {m.addr for m in self.membership.live()}
        known = addr == self.membership.me.addr or addr in members
        if not known and self._seeds.add(addr, self.clock.now(), configured):
            self._seeds_changed.set()

    def set_ready(self, epoch: Epoch) -> None:
        """Tell the mesh our shard for `epoch` is loaded: pushed to every member at once, as
        a chain after a failover waits on the last of its stages to say so."""
        self.membership.update_me(ready=epoch)
        self._notify()
        self._push_soon.set()

    def addr_of(self, node: NodeId) -> str | None:
        member = self.membership.get(node)
        return member.addr if member is not None and member.state.live else None

    def chain_ready(self, plan: PlanRecord) -> bool:
        """Every stage of `plan` is on a live member that serves its epoch."""
        for stage in plan.stages:
            member = self.membership.get(stage.device)
            if member is None or not member.state.live or member.ready != plan.epoch:
                return False
        return True

    def set_profile(self, profile: Profile) -> None:
        """Publish a new version of our own profile."""
        old = self.profiles[self.id]
        self.profiles[self.id] = replace(profile, id=self.id, version=old.version + 1)
        self.membership.update_me(profile_version=old.version + 1)

    # -- requests from other peers -----------------------------------------------------------

    async def handle(self, msg: ControlMessage) -> ControlMessage:
        match msg:
            case Ping(sender=sender, updates=updates, plan=plan):
                self._absorb(sender, updates, plan)
                return Ack(
                    self.membership.me, tuple(self.membership.piggyback()), self.book.current
                )
            case PingReq(sender=sender, target=target, target_addr=addr, updates=updates):
                self._absorb(sender, updates, None)
                ping = Ping(
                    self.membership.me,
                    tuple(self.membership.piggyback(to=target)),
                    self.book.current,
                )
                try:
                    reply = await self.transport.send(addr, ping, self.timings.probe_timeout)
                except TransportError:
                    return Nack(self.membership.me, target)
                if isinstance(reply, Ack):
                    self._absorb(reply.sender, reply.updates, reply.plan)
                    if reply.sender.id == target:
                        return reply
                return Nack(self.membership.me, target)
            case Sync():
                self._absorb_sync(msg)
                return self._sync_message()
            case Ack() | Nack():
                raise TransportError("an answer is not a request")

    # -- loops -------------------------------------------------------------------------------

    async def _probe_round(self) -> None:
        start = self.clock.now()
        self._heard = {n: t for n, t in self._heard.items() if self.membership.get(n)}
        for change in self.membership.tick(start, self._heard):
            self._changed(change)
        self._notify()
        target = self.membership.next_probe_target()
        if target is not None:
            await self._probe(target)
            self._notify()
        await self.clock.sleep(max(0.0, start + self.timings.probe_interval - self.clock.now()))

    async def _probe(self, target: Member) -> None:
        """SWIM's probe: directly, then through helpers; a target none of us reaches is
        suspected, or dead at once if its host refused us (a crashed process)."""
        updates = tuple(self.membership.piggyback(to=target.id))
        ping = Ping(self.membership.me, updates, self.book.current)
        refused = False
        timeout = self.membership.scaled(self.timings.probe_timeout)
        try:
            reply = await self.transport.send(target.addr, ping, timeout)
            if isinstance(reply, Ack):
                self._absorb(reply.sender, reply.updates, reply.plan)
                # Only the target itself vouches for itself: a member whose address answers
                # in another's name (a forged record) is probed as one that does not answer.
                if reply.sender.id == target.id:
                    self.membership.probe_answered()
                    return
        except TransportError as e:
            refused = e.refused
        helpers = self.membership.helpers(target.id)
        if helpers:
            answers = await asyncio.gather(*(self._ask(h, target) for h in helpers))
            if any(a is True for a in answers):
                return
            self.membership.missed_nacks(sum(a is None for a in answers))
        now = self.clock.now()
        heard = now - self._heard.get(target.id, -math.inf)
        if not refused and heard < self.membership.scaled(self.timings.suspicion_timeout):
            return  # its frames arrive: busy, not gone
        change = self.membership.probe_failed(target.id, now, refused)
        if change:
            self._changed(change)

    def unreachable(self, addr: str) -> None:
        """The data plane lost its link to `addr` (a socket closed under it, a connection
        refused): probe that member now, not at its turn, so a crash is known in a round
        trip rather than a suspicion timeout."""
        if addr in self._evidence_queued or self._evidence.full():
            return
        if any(m.addr == addr for m in self.membership.others()):
            self._evidence_queued.add(addr)
            self._evidence.put_nowait(addr)

    def heard(self, addr: str) -> None:
        """A data frame came from `addr`: that member is alive, whatever its probes say."""
        member = self._by_addr(addr)
        if member is not None:
            self._heard[member.id] = self.clock.now()

    async def _push_round(self) -> None:
        await self._push_soon.wait()
        self._push_soon.clear()
        await self._push_all(self.timings.probe_timeout * 4)

    async def _confirm_round(self) -> None:
        addr = await self._evidence.get()
        self._evidence_queued.discard(addr)
        member = self._by_addr(addr)
        if member is not None:
            self.events.add("probe", f"{member.id}: its data link failed; probing it now")
            await self._probe(member)
            self._notify()

    def frame_limit(self, addr: str) -> int:
        """The largest data-plane frame the member at `addr` takes, as its profile says (0:
        unknown)."""
        profile = self._profile_at(addr)
        return profile.frame if profile is not None else 0

    def raw_port(self, addr: str) -> int:
        """The port of the raw links of the member at `addr`, as its profile says (0: none)."""
        profile = self._profile_at(addr)
        return profile.raw if profile is not None else 0

    def link_mbps(self, addr: str) -> float:
        """The measured rate of the link between this peer and the member at `addr`, by
        either end's measurement, ours first (0: not measured)."""
        member = self._by_addr(addr)
        if member is None:
            return 0.0
        theirs = self.profiles.get(member.id)
        stat = self.profiles[self.id].links.get(member.id) or (
            theirs.links.get(self.id) if theirs is not None else None
        )
        return stat.mbps if stat is not None else 0.0

    def _profile_at(self, addr: str) -> Profile | None:
        member = self._by_addr(addr)
        return self.profiles.get(member.id) if member is not None else None

    def _by_addr(self, addr: str) -> Member | None:
        return next((m for m in self.membership.others() if m.addr == addr), None)

    async def _ask(self, helper: Member, target: Member) -> bool | None:
        """An indirect probe through `helper`: True if the target answered it, False if the
        helper said it could not reach the target, None if the helper said nothing at all."""
        req = PingReq(
            self.membership.me, target.id, target.addr, tuple(self.membership.piggyback())
        )
        timeout = self.membership.scaled(2 * self.timings.probe_timeout)
        try:
            reply = await self.transport.send(helper.addr, req, timeout)
        except TransportError:
            return None
        if isinstance(reply, Ack) and reply.sender.id == target.id:
            self._absorb(reply.sender, reply.updates, reply.plan)
            return True
        return False

    async def _sync_round(self) -> None:
        """Push/pull with a member whose newer profile we lack, else with a random one, now
        and then with one we think dead (memberlist's gossip to the dead: so the two sides of
        a healed partition learn that each other are alive)."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self.timings.pushpull_interval):
                addr = await self._fetch.get()
                self._fetching.discard(addr)
        except TimeoutError:
            others = self.membership.others()
            dead = [m for m in self.membership.members() if m.state == State.DEAD]
            if dead and (not others or self.rng.random() < DEAD_GOSSIP):
                others = dead
            if not others:
                return
            addr = self.rng.choice(others).addr
        await self._sync(addr, self.timings.probe_timeout * 4)

    async def _introduce_round(self) -> None:
        """Try the next address that is due (seeds, discovery), beside member gossip."""
        now = self.clock.now()
        members = {m.addr for m in self.membership.live()}
        addr = self._seeds.due(now, members)
        if addr is None:
            due = self._seeds.next_try(members)
            wait = self.timings.pushpull_interval if due is None else max(due - now, 0.01)
            self._seeds_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, self.timings.pushpull_interval)):
                    await self._seeds_changed.wait()
            return
        if await self._sync(addr, self.timings.probe_timeout * 4):
            self._seeds.answered(addr, self.clock.now())
        else:
            self._seeds.failed(addr, self.clock.now())

    async def _sync(self, addr: str, timeout: float) -> bool:
        """Exchange state with `addr`; whether it answered."""
        try:
            reply = await self.transport.send(addr, self._sync_message(), timeout)
        except TransportError:
            return False
        if isinstance(reply, Sync):
            self._absorb_sync(reply)
        return True

    async def _push_all(self, timeout: float) -> None:
        others = self.membership.others()
        await asyncio.gather(*(self._sync(m.addr, timeout) for m in others))

    async def _coordinate_round(self) -> None:
        # Look again on any change (a death is worth acting on at once), else now and then
        # for a debounce that has run out.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self.timings.replan_debounce / 2, 0.02)):
                await self.pulse.after(self._coordinated)
        self._coordinated = self.pulse.version
        members = self._plannable()
        live = frozenset(m.id for m in members if m.serving)
        current = self.book.current
        view = View(
            me=self.id,
            coordinator=self.coordinator,
            leaving=self._leaving,
            live=live,
            signature=signature(members, self.profiles, self.model),
            pinned=self._pinned,
            current=current,
            unwell=self._unwell(current, set(live)) if current is not None else "",
        )
        decision = decide(view, self.clock.now(), self.replanner)
        if isinstance(decision, Keep):
            if decision.unpin:
                self._pinned = None
            return
        self._pinned = None
        try:
            inst = mesh_instance(
                members, self.profiles, self.units, self.model, self.id, self.context_tokens
            )
            # A lost stage's precomputed fallback, where it still fits: standbys hold its units.
            plan = (standing(current, live, inst) if current is not None else None) or make_plan(
                inst, self.objective, self.id, self.model, decision.reason
            )
        except InstanceError as e:
            if str(e) != self.plan_error:
                self.events.add("plan-error", f"cannot plan: {e}")
            self.plan_error = str(e)
            return
        self.plan_error = ""
        measured = all(p.measured for n, p in self.profiles.items() if n in live)
        # A plan made on estimated profiles is redone once they are measured, gain or not.
        settled = not (self._guessed and measured)
        better = current is None or _worth_it(inst, current, plan)
        reason = decision.reason
        if not worth_publishing(decision, settled, better):
            assert current is not None  # only a plan in force of ours is kept
            # The plan in force stands (no churn), but its fallbacks follow the members: a
            # spare that joined gives stages a fallback they lacked. Not while a stage is
            # unwell: its fallback may be needed any moment, as it stands.
            if view.unwell:
                return
            plan = with_fallbacks(current, members, self.profiles, self.units, self.context_tokens)
            if not outdated(current, plan, live):
                return
            reason += "; the plan stands, with new fallbacks"
        else:
            self._guessed = not measured
            plan = with_fallbacks(plan, members, self.profiles, self.units, self.context_tokens)
        epoch = self.book.next_epoch(self.id, self.clock.wall())
        self._adopt(self._shaped(plan, epoch, reason))
        await self._push_all(self.timings.probe_timeout * 4)

    def _shaped(self, plan: PlanRecord, epoch: Epoch, reason: str) -> PlanRecord:
        """A new plan, with what the data plane runs it by under today's profiles and links."""
        waved = plan_waves(self, plan)
        return replace(waved, epoch=epoch, reason=reason, head_share=plan_head_share(self, plan))

    async def _link_round(self) -> None:
        """Measure the link to every member, soon after start and then every link_interval
        (see estimates.py for what is believed of them)."""
        await self.clock.sleep(self._link_wait)
        self._link_wait = min(self._link_wait * 2, self.timings.link_interval)
        for member in self.membership.others():
            try:
                self._links.add(
                    member.id, await self.transport.measure(member.addr, MEASURE_TIMEOUT)
                )
            except TransportError:
                continue
        self._links.keep(m.id for m in self.membership.live())
        links = self._links.best()
        # Read our profile after measuring: profiling may have finished meanwhile.
        me = self.profiles[self.id]
        if material(me.links, links):
            self.set_profile(replace(me, links=links))

    # -- merging what we hear ----------------------------------------------------------------

    def _absorb(self, sender: Member, updates: Sequence[Member], plan: PlanRecord | None) -> None:
        now, wall = self.clock.now(), self.clock.wall()
        believed = []
        for member in (sender, *updates):
            if problem := member_problem(member, wall):
                self._refuse("member", problem)
            else:
                believed.append(member)
        for change in self.membership.apply_all(believed, now):
            self._changed(change)
        for member in believed:
            known = self.profiles.get(member.id)
            if (
                member.state.live
                and member.id != self.id
                and (known is None or known.version < member.profile_version)
                and member.addr not in self._fetching
            ):
                with contextlib.suppress(asyncio.QueueFull):  # fetch it by push/pull
                    self._fetch.put_nowait(member.addr)
                    self._fetching.add(member.addr)
        if plan is not None:
            self._adopt(plan)
        self._notify()

    def _absorb_sync(self, msg: Sync) -> None:
        for profile in msg.profiles:
            problem = profile_problem(profile, msg.sender.id, self.model, len(self.units))
            if problem:
                self._refuse("profile", problem)
                continue
            known = self.profiles.get(profile.id)
            if profile.id != self.id and (known is None or known.version < profile.version):
                self.profiles[profile.id] = profile
        self._absorb(msg.sender, msg.members, msg.plan)

    def _sync_message(self) -> Sync:
        """Our view of the members, our own profile (each member's comes only from it), and
        the plan we follow."""
        return Sync(
            self.membership.me,
            tuple(self.membership.members()),
            (self.profiles[self.id],),
            self.book.current,
        )

    @functools.cached_property
    def _unit_mem(self) -> list[float]:
        """What each unit needs of a device, as plans count it (weights, planned KV)."""
        return [
            float(u.weight_bytes + u.kv_bytes_per_token * self.context_tokens) for u in self.units
        ]

    def _offered(self, node: NodeId) -> float | None:
        profile = self.profiles.get(node)
        return profile.mem if profile is not None and profile.model == self.model else None

    def _notify(self) -> None:
        """Wake whoever waits on the pulse, if members or the plan changed since last time."""
        state = (self.membership.version, self.book.current)
        if state != self._notified:
            self._notified = state
            self.pulse.fire()

    def _refuse(self, kind: str, problem: str) -> None:
        self.refused[kind] += 1
        if self.refused[kind] <= 3 or self.refused[kind] % 1000 == 0:
            logger.warning("[%s] refused gossip (%d so far): %s", self.id, self.refused[kind],
                           problem)  # fmt: skip

    def _adopt(self, plan: PlanRecord) -> None:
        if self.book.current is not None and plan.epoch <= self.book.current.epoch:
            return  # what we follow already (the common case: cheap)
        problem = plan_problem(
            plan, self.model, self._unit_mem, self.membership.get, self._offered, self.clock.wall()
        )
        if problem:
            self._refuse("plan", problem)
            return
        if not self.book.offer(plan):
            return
        stages = " ".join(f"{s.device}[{s.start}:{s.end})" for s in plan.stages)
        self.events.epoch = (plan.epoch.term, str(plan.epoch.coordinator))
        self.events.add("plan", f"plan epoch {plan.epoch}: {stages} ({plan.reason})")
        if self.on_plan is not None:
            self.on_plan(plan)
        self._notify()

    def _changed(self, change: Change) -> None:
        self.events.add("member", str(change), change.member.state.value)
        if change.member.state in (State.DEAD, State.LEFT):
            self.profiles.pop(change.member.id, None)


def _worth_it(inst: Instance, current: PlanRecord, new: PlanRecord) -> bool:
    """Replace a still-valid plan only if the new one is better by more than REPLAN_GAIN
    under today's numbers: moving shards costs a reload and in-flight sessions."""
    try:
        cost = evaluate(inst, [Stage(s.device, s.start, s.end) for s in current.stages])
    except InstanceError:
        return True  # the plan in force no longer fits (memory changed, member unusable)
    if current.objective == "throughput":
        old, value = cost.ms_per_token(), per_token_ms(new.bottleneck_ms, new.latency_ms, SESSIONS)
    else:
        old, value = cost.latency_ms, new.latency_ms
    return value < old * (1 - REPLAN_GAIN)
