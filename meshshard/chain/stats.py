"""What one peer's data plane has done: one object that status and metrics both read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChainStats:
    # As an origin: answers started here, tokens streamed to their callers, feeds that went
    # back over positions already fed (a cache was lost), and KV handoffs completed.
    sessions_started: int = 0
    tokens_out: int = 0
    replays: int = 0
    handoffs: int = 0
    # ... passes through the chain (decode steps), tokens drafted for them to verify, and
    # drafted tokens the chain confirmed (speculative decoding).
    passes: int = 0
    drafted: int = 0
    kept: int = 0
    # As a stage: layers of KV cache handed to new owners and taken from old ones, new
    # sessions refused for want of memory, steps run by the stages since replaced, and
    # plans served on preloaded units (warm standbys) with no load.
    kv_layers_sent: int = 0
    kv_layers_received: int = 0
    busy: int = 0
    steps_before: int = 0
    standbys_used: int = 0

    def per_pass(self) -> tuple[float, float]:
        """Positions each pass ran and tokens it gave, on average (1, 1 before any)."""
        if not self.passes:
            return 1.0, 1.0
        return 1 + self.drafted / self.passes, 1 + self.kept / self.passes

    def speculation(self) -> dict[str, float]:
        """Speculative decoding as status shows it: tokens per pass (1.0 without it)."""
        per_pass = self.per_pass()[1] if self.passes else 0.0
        return {
            "passes": self.passes,
            "drafted": self.drafted,
            "kept": self.kept,
            "tokens_per_pass": round(per_pass, 2),
        }
