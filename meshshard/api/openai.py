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
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshshard.api.choices import Choices
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
MAX_CHOICES = 8  # answers one request may ask for at once (`n`)
# Fields that would change an answer in ways this mesh does not do: refused, not ignored, so
# a client never takes an answer for what it did not ask. Each with the values that ask for
# nothing (what clients send by default).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),  # 0 == False here too
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


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
    n: int = 1


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
            web.get("/v1/models/{model}", self.handle_model),
        ]

    def _card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "meshshard"}

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def handle_model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model:
            return _error(404, f"this mesh serves {self.model} only", "model_not_found")
        return web.json_response(self._card())

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
                if isinstance(content, list):  # content parts: text only (no images, audio)
                    if not all(_text_part(p) for p in content):
                        raise BadRequest("message content parts must be text: the model reads text")
                    content = "".join(p["text"] for p in content)
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
        usages = [Usage() for _ in range(req.n)]
        choices = Choices([self._text(req, i, u) for i, u in enumerate(usages)])
        try:  # closed on every way out, a client hanging up included: its sessions end at once
            try:
                # The first pieces decide the status: a chain with no room refuses before any.
                await choices.started()
            except ChainBusy as e:
                retry = {"Retry-After": str(math.ceil(e.retry_after))}
                return _error(429, f"the mesh is busy: {e}", "mesh_busy", retry)
            except ChainError as e:
                return _unavailable(e)
            if req.stream:
                return await self._stream(request, choices, usages, rid, created, chat)
            texts, finish = [""] * req.n, ["length"] * req.n
            try:
                async for i, piece, reason in choices.pieces():
                    texts[i] += piece
                    finish[i] = reason or finish[i]
            except ChainError as e:
                return _unavailable(e)
            out: list[dict[str, Any]] = []
            for i, (text, reason) in enumerate(zip(texts, finish, strict=True)):
                said = {"role": "assistant", "content": text}
                body = {"message": said} if chat else {"text": text}
                out.append({"index": i, "finish_reason": reason, **body})
            return web.json_response(
                {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": self.model,
                    "choices": out,
                    "usage": _usage(usages),
                    "meshshard": _extra(usages),
                }
            )
        finally:
            await choices.aclose()

    async def _stream(
        self,
        request: web.Request,
        choices: Choices,
        usages: list[Usage],
        rid: str,
        created: int,
        chat: bool,
    ) -> web.StreamResponse:
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
            for i in range(len(usages)):
                role = {"role": "assistant", "content": ""}
                await event({"index": i, "delta": role, "finish_reason": None})
        finish = ["length"] * len(usages)
        try:
            async for i, piece, reason in choices.pieces():
                finish[i] = reason or finish[i]
                if piece:
                    delta = {"delta": {"content": piece}} if chat else {"text": piece}
                    await event({"index": i, **delta, "finish_reason": None})
        except ChainError as e:
            error = {"error": {"message": str(e), "type": "mesh_unavailable"}}
            await resp.write(f"data: {json.dumps(error)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        for i, reason in enumerate(finish[:-1]):
            await event({"index": i, **last, "finish_reason": reason})
        end = {"index": len(finish) - 1, **last, "finish_reason": finish[-1]}
        await event(end, usage=_usage(usages), meshshard=_extra(usages))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _text(
        self, req: Request, index: int, usage: Usage
    ) -> AsyncGenerator[tuple[str, str | None], None]:
        """Choice `index`'s (text piece, finish reason or None); stop strings are applied
        here. With a seed, choice i samples with seed + i: each reproducible, none alike."""
        stream = self.codec.stream()
        stops = StopMatcher(req.stops)
        seed = None if req.seed is None else (req.seed + index) % MAX_SEED
        sampling = (req.temperature, req.top_p, seed)
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


def _parse(body: dict[str, Any], prompt_ids: list[int], context: int) -> Request:
    """The request's fields within what the mesh carries (the wire's ranges, the context a
    session may hold), or BadRequest saying which is not."""
    for name, nothing in UNSUPPORTED.items():
        if body.get(name) not in nothing:
            raise BadRequest(f"{name} is not supported by this mesh")
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
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be an integer in 1..{MAX_CHOICES}")
    return Request(prompt_ids, max_tokens, temperature, top_p, seed, stops, stream, n)


def _text_part(part: Any) -> bool:
    """A content part of text: the only kind the model reads."""
    if not isinstance(part, dict):
        return False
    return part.get("type") == "text" and isinstance(part.get("text"), str)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in {low}..{high}")
    return float(value)


def _usage(usages: list[Usage]) -> dict[str, int]:
    """The prompt once, as OpenAI counts it, and every choice's tokens."""
    prompt, completion = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _extra(usages: list[Usage]) -> dict[str, Any]:
    """The first choice's epoch and timing; with several, each choice's too."""
    out = _timing(usages[0])
    if len(usages) > 1:
        out["choices"] = [_timing(u) for u in usages]
    return out


def _timing(u: Usage) -> dict[str, Any]:
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
