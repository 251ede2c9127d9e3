"""OpenAI-compatible endpoints on every peer: /v1/chat/completions, /v1/completions, /v1/models.

Answers run through the mesh from this peer as origin; `stream: true` gives server-sent
events. A final `meshshard` field carries the plan epoch and timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshshard.api.stops import StopMatcher
from meshshard.chain.origin import ChainBusy, ChainError, MeshTooSmall, Origin, Usage
from meshshard.edge.bodies import request_body
from meshshard.model.text import TextCodec
from meshshard.wire import MAX_SEED

MAX_BODY = 1024 * 1024
MAX_TOKENS = 4096
DEFAULT_MAX_TOKENS = 256
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool


class OpenAIApi:
    def __init__(
        self,
        origin: Origin,
        codec: asyncio.Future[TextCodec],
        model: str,
        body_timeout: float,
        context: int,
    ) -> None:
        self.origin, self._codec, self.model = origin, codec, model
        self._body_timeout = body_timeout
        self._context = context  # tokens of prompt and answer a session may hold

    @property
    def codec(self) -> TextCodec:
        return self._codec.result()

    @web.middleware
    async def tokenizer_ready(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Requests wait for the tokenizer, which loads in the background at start-up."""
        if request.path.startswith("/v1/") and not self._codec.done():
            await asyncio.shield(self._codec)
        return await handler(request)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.handle_chat),
            web.post("/v1/completions", self.handle_completion),
            web.get("/v1/models", self.handle_models),
        ]

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.model, "object": "model", "created": 0, "owned_by": "meshshard"}
                ],
            }
        )

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json(request, self._body_timeout)
            messages = body.get("messages")
            if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
                raise BadRequest(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
            clean = []
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise BadRequest("each message needs a role: system, user or assistant")
                content = m.get("content")
                if isinstance(content, list):  # content parts: keep the text ones
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if not isinstance(content, str):
                    raise BadRequest("message content must be a string")
                clean.append({"role": m["role"], "content": content})
            req = _parse(body, self.codec.encode_chat(clean), self._context)
        except BadRequest as e:
            return _error(400, str(e))
        return await self._respond(request, req, chat=True)

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json(request, self._body_timeout)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("prompt must be a non-empty string")
            req = _parse(body, self.codec.encode(prompt), self._context)
        except BadRequest as e:
            return _error(400, str(e))
        return await self._respond(request, req, chat=False)

    async def _respond(self, request: web.Request, req: Request, chat: bool) -> web.StreamResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        usage = Usage()
        # Closed on every way out, a client hanging up included: its session ends at once.
        async with contextlib.aclosing(self._text(req, usage)) as pieces:
            try:
                # The first piece decides the status: a chain with no room refuses before any.
                first = await anext(pieces)
            except ChainBusy as e:
                retry = {"Retry-After": str(math.ceil(e.retry_after))}
                return _error(429, f"the mesh is busy: {e}", "mesh_busy", retry)
            except ChainError as e:
                return _unavailable(e)
            if not req.stream:
                text, finish = first[0], first[1] or "length"
                try:
                    async for piece, reason in pieces:
                        text += piece
                        finish = reason or finish
                except ChainError as e:
                    return _unavailable(e)
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                return web.json_response(
                    {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": self.model,
                        "choices": [choice],
                        "usage": _usage(usage),
                        "meshshard": _extra(usage),
                    }
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"

            async def event(choice: dict[str, Any], **extra: Any) -> None:
                data = {"id": rid, "object": chunk_kind, "created": created, "model": self.model}
                data |= {"choices": [choice], **extra}
                await resp.write(f"data: {json.dumps(data)}\n\n".encode())

            if chat:
                await event(
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                )
            finish = "length"
            try:
                async for piece, reason in _chain(first, pieces):
                    finish = reason or finish
                    if piece:
                        delta = {"delta": {"content": piece}} if chat else {"text": piece}
                        await event({"index": 0, **delta, "finish_reason": None})
            except ChainError as e:
                error = {"error": {"message": str(e), "type": "mesh_unavailable"}}
                await resp.write(f"data: {json.dumps(error)}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                return resp
            last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
            await event(
                {"index": 0, **last, "finish_reason": finish},
                usage=_usage(usage),
                meshshard=_extra(usage),
            )
            await resp.write(b"data: [DONE]\n\n")
            return resp

    async def _text(
        self, req: Request, usage: Usage
    ) -> AsyncGenerator[tuple[str, str | None], None]:
        """(text piece, finish reason or None); stop strings are applied here."""
        stream = self.codec.stream()
        stops = StopMatcher(req.stops)
        sampling = (req.temperature, req.top_p, req.seed)
        count = 0
        tokens = self.origin.generate(
            req.prompt_ids, req.max_tokens, sampling, self.codec.stop_ids, usage
        )
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                count += 1
                piece = stops.feed(stream.push(token))
                if stops.stopped:
                    yield piece, "stop"
                    return
                yield piece, None
        yield stops.flush(), "length" if count >= req.max_tokens else "stop"


async def _json(request: web.Request, timeout: float) -> dict[str, Any]:
    """The whole body as a JSON object (BadRequest), or the HTTP error for a body too large,
    cut short or too slow."""
    try:
        body = json.loads(await request_body(request, MAX_BODY, timeout))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def _chain(
    first: tuple[str, str | None], rest: AsyncIterator[tuple[str, str | None]]
) -> AsyncIterator[tuple[str, str | None]]:
    yield first
    async for item in rest:
        yield item


def _parse(body: dict[str, Any], prompt_ids: list[int], context: int) -> Request:
    """The request's fields within what the mesh carries (the wire's ranges, the context a
    session may hold), or BadRequest saying which is not."""
    if not prompt_ids:
        raise BadRequest("the prompt is empty")
    if len(prompt_ids) >= context:
        raise BadRequest(
            f"the prompt has {len(prompt_ids)} tokens; this mesh holds {context} per answer"
        )
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    room = min(MAX_TOKENS, context - len(prompt_ids))
    max_tokens = min(DEFAULT_MAX_TOKENS, room) if given is None else given
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be an integer in 1..{MAX_TOKENS}")
    if max_tokens > room:
        raise BadRequest(
            f"max_tokens {max_tokens} is more than the {room} this prompt of "
            f"{len(prompt_ids)} tokens leaves (at most {MAX_TOKENS}; {context} in all)"
        )
    temperature = _number(body.get("temperature", 1.0), "temperature", 0, 2)
    top_p = _number(body.get("top_p", 1.0), "top_p", 0, 1)
    if top_p == 0:
        raise BadRequest("top_p must be above 0")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED
    ):
        raise BadRequest(f"seed must be an integer in 0..{MAX_SEED - 1}")
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise BadRequest(f"stop must be a string or a list of at most 4 strings of 1 to "
                         f"{MAX_STOP_CHARS} characters")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    return Request(prompt_ids, max_tokens, temperature, top_p, seed, stops, stream)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in {low}..{high}")
    return float(value)


def _usage(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _extra(u: Usage) -> dict[str, Any]:
    decode = u.elapsed_s - u.ttft_s
    rate = (u.completion_tokens - 1) / decode if u.completion_tokens > 1 and decode > 0 else 0.0
    return {
        "epoch": list(u.epoch),
        "ttft_s": round(u.ttft_s, 4),
        "elapsed_s": round(u.elapsed_s, 4),
        "tokens_per_s": round(rate, 2),
    }


def _unavailable(e: ChainError) -> web.Response:
    """503; with Retry-After where asking again later may work (a mesh too small for now)."""
    headers = None
    if isinstance(e, MeshTooSmall):
        headers = {"Retry-After": str(math.ceil(e.retry_after))}
    return _error(503, str(e), "mesh_unavailable", headers)


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind}}, status=status, headers=headers
    )
