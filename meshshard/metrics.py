"""GET /metrics: this peer in Prometheus format.

Stage step times are observed as they happen (a histogram); everything else is read from the
peer's own counters at scrape time, so there is one source of truth for status and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshshard.events import Event

if TYPE_CHECKING:
    from meshshard.chain.channel import FrameCodec
    from meshshard.chain.service import ChainService
    from meshshard.edge.serve import ConnectionGate
    from meshshard.mesh.node import ControlNode

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(
        self,
        node: ControlNode,
        service: ChainService,
        codec: FrameCodec,
        gates: Mapping[str, ConnectionGate] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "meshshard_stage_step_seconds",
            "Forward pass time of one batch of this peer's stage",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.replans = 0
        self.membership: dict[str, int] = {}
        self.registry.register(_Counters(self, node, service, codec, gates or {}))
        node.events.listen(self._event)
        service.observe(self._step)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _step(self, steps: int, seconds: float, decode: bool) -> None:
        self.step_seconds.labels("decode" if decode else "prefill").observe(seconds)

    def _event(self, event: Event) -> None:
        if event.kind == "plan":
            self.replans += 1
        elif event.kind == "member" and event.tag:
            self.membership[event.tag] = self.membership.get(event.tag, 0) + 1


C, G = CounterMetricFamily, GaugeMetricFamily
_Family = type[CounterMetricFamily | GaugeMetricFamily]


class _Counters(Collector):
    def __init__(
        self,
        metrics: Metrics,
        node: ControlNode,
        service: ChainService,
        codec: FrameCodec,
        gates: Mapping[str, ConnectionGate],
    ) -> None:
        self._metrics, self._node, self._service, self._codec = metrics, node, service, codec
        self._gates = gates

    def collect(self) -> Iterator[Metric]:
        service, node, metrics = self._service, self._node, self._metrics
        stage, plan = service.follower.stage, node.book.current
        stats = service.stats
        plain: list[tuple[Callable[..., Metric], str, str, float]] = [
            (C, "tokens_generated", "Tokens streamed to users of this peer", stats.tokens_out),
            (C, "sessions", "Answers started at this peer", stats.sessions_started),
            (G, "sessions_open", "Answers in progress at this peer", service.origin.open_sessions),
            (C, "sessions_refused", "New sessions this peer's stage had no KV memory for",
             stats.busy),
            (G, "kv_reserved_tokens", "KV cache positions sessions reserved on this stage",
             service.follower.budget.reserved),
            (G, "stage_sessions", "Sessions whose cache this peer's stage holds",
             len(stage.shard.sessions) if stage else 0),
            (C, "stage_steps", "Steps this peer's stages ran", service.follower.steps),
            (C, "hop_bytes_received", "Data-plane bytes received", self._codec.received_bytes),
            (C, "replans", "Plans this peer adopted", metrics.replans),
            (G, "members_alive", "Members this peer sees alive", len(node.membership.live())),
            (C, "kv_handoffs", "KV handoffs completed for answers of this peer", stats.handoffs),
            (C, "replays", "Feeds that rebuilt a lost cache", stats.replays),
            (C, "passes", "Decode passes through the chain for answers of this peer",
             stats.passes),
            (C, "drafted_tokens", "Tokens drafted for the chain to verify", stats.drafted),
            (C, "kept_tokens", "Drafted tokens the chain confirmed", stats.kept),
            (G, "plan_epoch", "Term of the plan in force", plan.epoch.term if plan else 0),
            (G, "predicted_latency_seconds", "The plan's predicted time per token",
             plan.latency_ms / 1000 if plan else 0),
            (G, "measured_latency_seconds", "Measured time per token of this peer's answers",
             service.origin.meter.latency_ms / 1000),
        ]  # fmt: skip
        for kind, name, doc, value in plain:
            yield kind(f"meshshard_{name}", doc, value=value)
        gates = sorted(self._gates.items())
        labelled: list[tuple[_Family, str, str, str, Mapping[str, float]]] = [
            (C, "hop_bytes_sent", "Data-plane bytes sent, by next hop", "peer",
             service.sent_bytes()),
            (C, "membership_changes", "Member state changes seen, by new state", "state",
             metrics.membership),
            (C, "refused_connections",
             "Connections closed unread: over the caps per address or in all, by listener",
             "listener", {name: gate.refused for name, gate in gates}),
            (G, "open_connections", "Open connections, by listener", "listener",
             {name: gate.open for name, gate in gates}),
            (C, "loop_errors", "Rounds of a peer's loops that raised and were survived",
             "loop", node.loop_errors + service.loop_errors),
            (C, "refused_gossip", "Gossip well-formed but not believed (a future incarnation "
             "or term, a plan that does not fit, another member's profile), by kind", "kind",
             node.refused),
        ]  # fmt: skip
        for kind, name, doc, label, values in labelled:
            family = kind(f"meshshard_{name}", doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
