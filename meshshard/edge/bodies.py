"""Whole HTTP bodies, for servers and clients alike.

A body can arrive in several TCP segments: aiohttp's `content.read(n)` returns what has arrived
so far, not the body (a 20,000-byte POST split after 1,448 bytes was read as 1,448 bytes). Here
a body is read to its declared length or, without one, to its end, within a byte limit checked
before reading and a time limit, so a slow or endless sender costs a bounded wait and buffer.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


class BodyError(Exception):
    """A body that is too large, cut short, or too slow; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def read_body(
    stream: aiohttp.StreamReader, length: int | None, limit: int, timeout: float
) -> bytes:
    """Exactly `length` bytes (the declared Content-Length) or, without it, all bytes to the
    end; BodyError past `limit` bytes (refused unread when declared) or `timeout` seconds."""
    if length is not None and length > limit:
        raise BodyError(f"body of {length} bytes exceeds {limit}", 413)
    try:
        async with asyncio.timeout(timeout):
            if length is not None:
                return await stream.readexactly(length)
            chunks, size = [], 0
            async for chunk in stream.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyError(f"body exceeds {limit} bytes", 413)
                chunks.append(chunk)
            return b"".join(chunks)
    except asyncio.IncompleteReadError as e:
        raise BodyError(f"body ended after {len(e.partial)} of {length} bytes", 400) from None
    except TimeoutError:
        raise BodyError(f"body not received within {timeout:g} s", 408) from None


async def request_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """A request's whole body, or the HTTP error (413, 400 or 408) that refuses it."""
    try:
        return await read_body(request.content, request.content_length, limit, timeout)
    except BodyError as e:
        raise _refusal(e) from None


async def response_body(resp: aiohttp.ClientResponse, limit: int, timeout: float) -> bytes:
    """A response's whole body (BodyError if it is too large, cut short or too slow)."""
    return await read_body(resp.content, resp.content_length, limit, timeout)


def _refusal(e: BodyError) -> web.HTTPException:
    if e.status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=str(e))
    if e.status == 408:
        return web.HTTPRequestTimeout(text=str(e))
    return web.HTTPBadRequest(text=str(e))
