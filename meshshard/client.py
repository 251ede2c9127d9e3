"""A client of a peer's user API, stdlib only (so `meshshard ask` and `meshshard status` start
without aiohttp or torch): one place for addresses, tokens, JSON, streams and errors."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from meshshard.errors import MeshShardError


def fetch_status(peer: str, token: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The peer's status object (`GET /status`)."""
    data = _get_json(peer, "/status", token, timeout)
    if not isinstance(data, dict):
        raise MeshShardError(f"{peer} did not answer with a status object")
    return data


def ask(
    peer: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    system: str | None,
    on_text: Callable[[str], None],
    token: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Stream the answer through `on_text`; returns the answer with timing and epoch."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    if seed is not None:
        body["seed"] = seed
    started = time.monotonic()
    answer, finish = "", None
    extra: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    for event in _post_stream(peer, "/v1/chat/completions", body, token, timeout):
        if "error" in event:
            raise MeshShardError(f"the mesh could not answer: {event['error']['message']}")
        choice = event["choices"][0]
        piece = choice.get("delta", {}).get("content") or ""
        if piece:
            answer += piece
            on_text(piece)
        finish = choice.get("finish_reason") or finish
        extra = event.get("meshshard", extra)
        usage = event.get("usage", usage)
    return {
        "answer": answer,
        "finish_reason": finish,
        "epoch": extra.get("epoch"),
        "ttft_s": extra.get("ttft_s"),
        "tokens_per_s": extra.get("tokens_per_s"),
        "completion_tokens": usage.get("completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "wall_s": round(time.monotonic() - started, 3),
    }


def _url(peer: str, path: str) -> str:
    url = peer.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url + path


def _headers(token: str | None, json_body: bool = False) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return headers | ({"Content-Type": "application/json"} if json_body else {})


def _get_json(peer: str, path: str, token: str | None, timeout: float) -> Any:
    request = urllib.request.Request(_url(peer, path), headers=_headers(token))
    with _errors(peer), urllib.request.urlopen(request, timeout=timeout) as resp:
        try:
            return json.loads(resp.read())
        except ValueError:
            raise MeshShardError(f"{peer} did not answer with JSON") from None


def _post_stream(
    peer: str, path: str, body: dict[str, Any], token: str | None, timeout: float
) -> Iterator[dict[str, Any]]:
    """The data events of a server-sent event stream, until [DONE]."""
    request = urllib.request.Request(
        _url(peer, path), data=json.dumps(body).encode(), headers=_headers(token, True)
    )
    with _errors(peer), urllib.request.urlopen(request, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


@contextmanager
def _errors(peer: str) -> Iterator[None]:
    """HTTP and network failures as one-line MeshShardErrors naming the peer."""
    try:
        yield
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code} {e.reason}"
        if e.code == 429:
            message += f" (ask again in {e.headers.get('Retry-After', 'a few')} s)"
        raise MeshShardError(f"{peer}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MeshShardError(f"no peer answers at {peer}: {reason}") from None
