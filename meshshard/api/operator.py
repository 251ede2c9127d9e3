"""The operator's side of the user API: the dashboard page, its live feed, plan preview and
apply, and Prometheus metrics. Every peer serves them; only the coordinator applies plans.

    GET  /               the dashboard (one static page, no build step)
    GET  /status         the peer's status object (also `meshshard status --json`)
    GET  /events         server-sent events: the status object whenever something happens
    POST /plan/preview   {"use", "objective", "exclude"}: the plan that would be made, not applied
    POST /plan           the same, applied (coordinator only)
    GET  /metrics        Prometheus text format
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from aiohttp import web

from meshshard.edge.bodies import request_body
from meshshard.events import EventLog
from meshshard.mesh.node import ControlNode, PlanRefused
from meshshard.mesh.report import plan_json
from meshshard.metrics import CONTENT_TYPE, Metrics
from meshshard.planner.baselines import BASELINES, OLD_NAMES
from meshshard.planner.dp import OBJECTIVES

# The feed sends a fresh status at least this often, events or not (measured numbers move).
FEED_PERIOD = 1.0
MAX_BODY = 64 * 1024  # a plan request names a method, an objective and some members


class OperatorApi:
    def __init__(
        self,
        node: ControlNode,
        events: EventLog,
        metrics: Metrics,
        status: Callable[[], dict[str, Any]],
        body_timeout: float,
    ) -> None:
        self._node, self._events, self._metrics, self._status = node, events, metrics, status
        self._body_timeout = body_timeout
        self._closing = asyncio.Event()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.handle_page),
            web.get("/status", self.handle_status),
            web.get("/events", self.handle_events),
            web.post("/plan/preview", self.handle_preview),
            web.post("/plan", self.handle_apply),
            web.get("/metrics", self.handle_metrics),
        ]

    def close(self) -> None:
        """End every live feed (the server waits for open responses at shutdown)."""
        self._closing.set()

    async def handle_page(self, request: web.Request) -> web.Response:
        page = files("meshshard.api").joinpath("static/dashboard.html").read_text()
        return web.Response(text=page, content_type="text/html")

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while not self._closing.is_set():
                seen = self._events.last_seq
                body = json.dumps(self._status(), separators=(",", ":"))
                await response.write(f"event: status\ndata: {body}\n\n".encode())
                await self._events.wait(seen, FEED_PERIOD)
        except ConnectionResetError:
            pass  # the page went away
        return response

    async def handle_preview(self, request: web.Request) -> web.Response:
        return await self._plan(request, apply=False)

    async def handle_apply(self, request: web.Request) -> web.Response:
        return await self._plan(request, apply=True)

    async def _plan(self, request: web.Request, apply: bool) -> web.Response:
        body = await request_body(request, MAX_BODY, self._body_timeout)
        try:
            method, objective, exclude = _plan_request(json.loads(body))
        except (ValueError, TypeError) as e:
            return _error(f"bad request: {e}", 400)
        try:
            if apply:
                plan = await self._node.apply(method, objective, exclude)
            else:
                plan = self._node.preview(method, objective, exclude)
        except PlanRefused as e:
            return _error(str(e), 409)
        return web.json_response(plan_json(plan) | {"applied": apply})


def _plan_request(body: Any) -> tuple[str, Any, tuple[str, ...]]:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    method = body.get("use", "planner")
    if method not in ("planner", *BASELINES, *OLD_NAMES):
        raise ValueError(f"use must be planner or one of {', '.join(BASELINES)}")
    objective = body.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
    exclude = body.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise ValueError("exclude must be a list of member ids")
    return method, objective, tuple(exclude)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)
