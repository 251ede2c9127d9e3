"""Shared fixtures: tiny random models of each supported layout, built once per run; and a
check after every test that it left no task, thread or child process behind."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Threads that live for the whole run by design: the one model thread, asyncio's default
# executor (asyncio.to_thread), and zeroconf's.
POOLS = ("model", "asyncio_", "ThreadPoolExecutor", "zeroconf")

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_tiny(kind: str, folder: Path, layers: int = 4) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(**TINY | {"num_hidden_layers": layers}, tie_word_embeddings=True)
    elif kind == "llama-untied":
        config = LlamaConfig(**TINY, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = Qwen2Config(**TINY, tie_word_embeddings=False)
    elif kind == "mistral":
        config = MistralConfig(**TINY, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves tiny logits that tie easily; widen them so greedy choices are stable.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "llama-untied", "qwen2", "mistral"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("llama-single"))


def _children() -> set[int]:
    """Processes whose parent is this one (not yet reaped zombies excluded)."""
    me, found = os.getpid(), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive() and not t.name.startswith(POOLS)}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread or a child process running (a few seconds' grace
    for what it stopped to end)."""
    threads, children = _threads(), _children()
    yield
    deadline = time.monotonic() + 5
    while True:
        extra_threads, extra_children = _threads() - threads, _children() - children
        if not (extra_threads or extra_children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra_threads, f"threads left running: {sorted(t.name for t in extra_threads)}"
    assert not extra_children, f"child processes left running: {sorted(extra_children)}"


def _no_task_left(test: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        before = asyncio.all_tasks()
        result = await test(*args, **kwargs)
        for _ in range(3):  # cancelled tasks need a turn or two to finish
            await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
        left = [t for t in left if not t.done()]
        assert not left, f"tasks left running: {left}"
        return result

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test also fails if it leaves a task of its own running. The pure and
    simulated tests run first: `./dev test` checks types beside them, and they do not
    measure the wall clock as the real-process tests do."""
    items.sort(key=lambda item: item.path.parent.name != "unit")  # stable: order kept within
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.obj = _no_task_left(item.obj)
