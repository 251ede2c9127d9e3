"""What keeps web pages in the user's browser from driving the user API.

A page from any site can send requests to 127.0.0.1 (a `no-cors` fetch needs no permission),
and a DNS-rebinding page can even read the answers, under a name of its own that resolves to
us. So the API answers only to names it expects in `Host` (loopback names, the address it is
bound to or was reached at, and `--api-allow-host`); a request that changes something must come
from no browser page or from the API's own pages (`Origin`), and carry `application/json`
(which a page cannot send to another origin without asking first); and no page may frame it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def host_name(host: str) -> str:
    """`Host` without its port, lower case: 'LOCALHOST:8200' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True)
class BrowserGuard:
    """`hosts`: the names this API answers to, besides the address each connection reached."""

    hosts: frozenset[str]

    @classmethod
    def for_api(cls, bind: str, allowed: Iterable[str] = ()) -> BrowserGuard:
        names = {host_name(h) for h in allowed} | LOOPBACK
        if bind not in ("0.0.0.0", "::"):
            names.add(host_name(bind))
        return cls(frozenset(names))

    def refusal(
        self,
        method: str,
        host: str | None,
        origin: str | None,
        content_type: str,
        local: str | None,
    ) -> tuple[int, str] | None:
        """Why a request is refused (status, message), or None to serve it. Pure."""
        if not host:
            return 400, "a request needs a Host header"
        name = host_name(host)
        if name not in self.hosts and name != local:
            return 403, f"this API does not answer to the host {name!r} (see --api-allow-host)"
        if method in SAFE_METHODS:
            return None
        if origin is not None and origin.lower() not in (f"http://{host}", f"https://{host}"):
            return 403, f"requests from the web page at {origin} may not change anything here"
        if method == "POST" and content_type != "application/json":
            return 415, "a request body must be application/json"
        return None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        local = request.transport.get_extra_info("sockname") if request.transport else None
        refused = self.refusal(
            request.method,
            request.headers.get("Host"),
            request.headers.get("Origin"),
            request.content_type,
            str(local[0]) if local else None,
        )
        if refused is not None:
            status, message = refused
            return web.json_response(
                {"error": {"message": message, "type": "refused"}}, status=status
            )
        return await handler(request)

    @staticmethod
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        """Every answer, streams and errors included, forbids framing and sniffing."""
        response.headers.update(HEADERS)
