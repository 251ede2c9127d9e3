"""Progress of the long steps a user waits on (model conversion, shard loading, profiling,
the chain getting ready): a bar on a terminal, a start and an end line in a log file."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# One bar at a time: steps run in the model thread and the event loop, rarely together.
_lock = threading.Lock()


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`. `total` None: a spinner with the time spent."""
    started = time.monotonic()
    if sys.stderr.isatty() and _lock.acquire(blocking=False):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        try:
            with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bar:
                task = bar.add_task(description, total=total)

                def advance(n: int = 1) -> None:
                    bar.advance(task, n)

                yield advance
        finally:
            _lock.release()
        return
    logger.info("%s…", description)
    yield _ignore
    logger.info("%s: done in %.1f s", description, time.monotonic() - started)


def _ignore(n: int = 1) -> None:
    pass
