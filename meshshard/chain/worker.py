"""One thread for all model work of a peer (imports, loading, profiling, forward passes).

transformers' lazy imports are not thread-safe, and a peer runs one stage at a time anyway:
serialising torch work on one thread keeps it correct and keeps the event loop free.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


async def run_model(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
