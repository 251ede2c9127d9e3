"""A loop that outlives a bad round: an exception in one iteration (a message no check
foresaw, a bug) is logged and counted, and the loop goes on after a pause, so no single
message can stop a peer's probing, gossip, planning or measuring."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

ERROR_PAUSE = 0.5  # seconds before the round after a failed one


async def rounds(
    name: str,
    body: Callable[[], Awaitable[None]],
    errors: Counter[str],
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """Run `body` forever; `errors[name]` counts the rounds that raised."""
    while True:
        try:
            await body()
        except Exception:
            errors[name] += 1
            if errors[name] <= 3 or errors[name] % 100 == 0:
                logger.exception("%s loop: round failed (%d so far); going on", name, errors[name])
            await sleep(ERROR_PAUSE)
