"""`meshshard ask`: stream an answer from any peer's OpenAI-compatible API (stdlib only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from meshshard.errors import MeshShardError


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
    url = peer.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
    )
    started = time.monotonic()
    answer, finish = "", None
    extra: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
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
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(e)
        if e.code == 429:
            message += f" (ask again in {e.headers.get('Retry-After', 'a few')} s)"
        raise MeshShardError(f"{peer}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MeshShardError(f"no peer answers at {peer}: {getattr(e, 'reason', e)}") from None
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
