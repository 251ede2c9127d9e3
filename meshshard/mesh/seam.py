"""The control plane's side of the seam: a ControlNode answering as `chain.seam.ControlPlane`.

The data plane holds one of these, not the node: it sees the plan in force, readiness, members'
addresses and the node's change pulse, and says when its stage is ready and what its links
learn of other peers (a link lost, frames arriving); nothing else."""

from __future__ import annotations

from meshshard.mesh.node import ControlNode
from meshshard.types import Epoch, NodeId, PlanRecord


class NodeSeam:
    def __init__(self, node: ControlNode) -> None:
        self._node = node

    @property
    def node(self) -> NodeId:
        return self._node.id

    @property
    def address(self) -> str:
        return self._node.membership.me.addr

    @property
    def context(self) -> int:
        return self._node.context_tokens

    def plan(self) -> PlanRecord | None:
        return self._node.book.current

    def ready(self, plan: PlanRecord) -> bool:
        return self._node.chain_ready(plan)

    def address_of(self, node: NodeId) -> str | None:
        return self._node.addr_of(node)

    def is_member_address(self, address: str) -> bool:
        return any(m.addr == address for m in self._node.membership.live())

    def set_ready(self, epoch: Epoch) -> None:
        self._node.set_ready(epoch)

    def plan_possible(self) -> bool:
        return not self._node.why_unplannable()

    def unreachable(self, address: str) -> None:
        self._node.unreachable(address)

    def heard(self, address: str) -> None:
        self._node.heard(address)

    def frame_limit(self, address: str) -> int:
        return self._node.frame_limit(address)

    def raw_port(self, address: str) -> int:
        return self._node.raw_port(address)

    def link_mbps(self, address: str) -> float:
        return self._node.link_mbps(address)

    def why_no_plan(self) -> str:
        return self._node.why_unplannable() or self._node.plan_error

    @property
    def version(self) -> int:
        return self._node.pulse.version

    async def changed(self, seen: int) -> int:
        return await self._node.pulse.after(seen)
