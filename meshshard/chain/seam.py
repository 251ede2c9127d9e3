"""The seam between the planes: all the data plane may see of the control plane.

The data plane needs the plan in force, whether a plan's chain is ready, a member's address,
a way to say "my stage for epoch E is loaded", and to hear when any of these may have changed
(so it waits on change instead of polling). It depends on this protocol only, never on the
control node's class; `meshshard.mesh.seam` implements it over a ControlNode, and tests can
implement it over anything.
"""

from __future__ import annotations

from typing import Protocol

from meshshard.types import Epoch, NodeId, PlanRecord


class ControlPlane(Protocol):
    @property
    def node(self) -> NodeId:
        """This peer's id."""
        ...

    @property
    def address(self) -> str:
        """This peer's address as the mesh knows it (host:port): where answers come back."""
        ...

    @property
    def context(self) -> int:
        """Tokens of prompt and answer a session may hold (`--context`, the same on every
        peer: what plans keep KV memory for)."""
        ...

    def plan(self) -> PlanRecord | None:
        """The plan in force."""
        ...

    def ready(self, plan: PlanRecord) -> bool:
        """Every stage of `plan` is on a live member that serves its epoch."""
        ...

    def address_of(self, node: NodeId) -> str | None:
        """A live member's address; None for anyone else."""
        ...

    def is_member_address(self, address: str) -> bool:
        """Whether a live member is at `address` (an origin still in the mesh)."""
        ...

    def set_ready(self, epoch: Epoch) -> None:
        """Tell the mesh this peer serves `epoch` (its stage for it is loaded)."""
        ...

    def unreachable(self, address: str) -> None:
        """The data plane lost its link to the peer at `address` (a socket closed under it,
        a connection refused): evidence of a crash for the control plane to confirm now."""
        ...

    def heard(self, address: str) -> None:
        """A frame arrived from the peer at `address`: evidence that it is alive."""
        ...

    def frame_limit(self, address: str) -> int:
        """The largest data-plane frame the member at `address` takes, as its profile says
        (0: unknown)."""
        ...

    def raw_port(self, address: str) -> int:
        """The port of the raw links of the member at `address` (0: it has none)."""
        ...

    def link_mbps(self, address: str) -> float:
        """The measured rate of the link to the member at `address` (0: not measured)."""
        ...

    def plan_possible(self) -> bool:
        """Whether the serving members can run the model without the ones leaving."""
        ...

    def why_no_plan(self) -> str:
        """What keeps a plan from being made now, in the planner's words ("" when nothing):
        the serving members cannot hold the model, say."""
        ...

    @property
    def version(self) -> int:
        """Counts changes to what this protocol answers."""
        ...

    async def changed(self, seen: int) -> int:
        """Wait for the first change after version `seen`; the new version."""
        ...
