"""One peer, wired together for `meshshard up`: model facts, HTTP endpoints, control plane,
discovery and profiling, with an ordered shutdown.

About our usual module's limit, for a reason: it is the one place where the parts meet, and
their start and their ordered shutdown read best side by side."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from meshshard import __version__
from meshshard.api.guard import BrowserGuard
from meshshard.api.openai import OpenAIApi
from meshshard.api.operator import OperatorApi
from meshshard.chain.channel import FrameCodec
from meshshard.chain.links import (
    DataLinks,
    Dispatch,
    Links,
    LinkWatch,
    Refusals,
    SocketServer,
)
from meshshard.chain.rawlinks import RawListener, listening
from meshshard.chain.service import ChainService
from meshshard.chain.worker import run_imports, run_setup
from meshshard.config import Config
from meshshard.delays import (
    Alarms,
    DelayedLinks,
    Delays,
    LateReading,
    answer_delays,
    request_delays,
)
from meshshard.edge.serve import ConnectionGate, serve
from meshshard.errors import MeshShardError
from meshshard.events import EventLog
from meshshard.mesh import report
from meshshard.mesh.discovery import Discovery
from meshshard.mesh.http import HttpTransport, control_routes
from meshshard.mesh.node import ControlNode
from meshshard.mesh.sanity import incarnation_at
from meshshard.mesh.seam import NodeSeam
from meshshard.metrics import Metrics
from meshshard.model.costs import estimated_ms, read_spec, unit_costs
from meshshard.model.device import Placement, offered_memory
from meshshard.model.source import resolve_model
from meshshard.planner.flow import PLAIN, Speculation
from meshshard.progress import progress
from meshshard.publish import load_publisher
from meshshard.rounds import rounds
from meshshard.security import Keyring, Sealer
from meshshard.stalls import StallWatch
from meshshard.types import Member, NodeId, Profile, State

logger = logging.getLogger(__name__)

# Gossip and status bodies are small; activation frames have their own limit.
MAX_REQUEST_BYTES = 2 * 1024 * 1024


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node: ControlNode | None = None
        self.service: ChainService | None = None
        self.sealer: Sealer | None = None
        self.gates: dict[str, ConnectionGate] = {}
        self.placement: Placement | None = None
        self._stop = asyncio.Event()
        self._started = time.time()
        self.stalls = StallWatch(2 * config.timings.probe_timeout)
        self.raw_port = 0  # where this peer's raw links come in (0: none)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        sealer = _sealer(config)  # a bad key file fails before anything slow starts
        raw = None
        if config.raw_port > 0 or (config.raw_port == 0 and config.announce is None):
            raw = listening(config.interface or "0.0.0.0", config.raw_port)
        try:
            await self._run(sealer, raw)
        finally:
            if raw is not None:
                raw.close()

    async def _run(self, sealer: Sealer, raw: socket.socket | None) -> None:
        config = self.config
        self.raw_port = raw.getsockname()[1] if raw is not None else 0
        delays, alarms = Delays.from_env(), Alarms()
        if delays:
            logger.warning("test-only link delays in force: %s", delays)
        placement = await asyncio.to_thread(config.placement)  # a bad device fails early too
        model_dir = await asyncio.to_thread(resolve_model, config.model, config.cache_dir)
        spec = read_spec(model_dir)
        units = unit_costs(model_dir, placement.dtype, placement.quantize)
        node_id = NodeId(config.node_id())
        addr = config.announce or f"{config.interface or _default_host()}:{config.port}"
        memory = config.memory if config.memory is not None else offered_memory(placement.device)
        logger.info("running on %s, offering %.0f MB", placement.describe(), memory / 1e6)
        profile = Profile(
            node_id, 1, spec.name, memory, estimated_ms(units), measured=False,
            device=placement.describe(), frame=config.max_frame_bytes,
            raw=self.raw_port,
        )  # fmt: skip
        self.placement = placement
        # A restarted peer must outrank its own old records: a time-based incarnation does.
        me = Member(node_id, addr, incarnation_at(time.time()), State.ALIVE, config.priority)
        # Our idle connections close before the other side's header timeout closes them
        # under a request we are about to send.
        connector = aiohttp.TCPConnector(keepalive_timeout=config.timings.header_timeout / 2)
        traces = [request_delays(delays, alarms)] if delays else []
        async with aiohttp.ClientSession(connector=connector, trace_configs=traces) as http:
            events = EventLog(node_id)
            node = ControlNode(
                me=me,
                events=events,
                profile=profile,
                units=units,
                timings=config.timings,
                transport=HttpTransport(http, sealer),
                objective=config.objective,  # type: ignore[arg-type]
                context_tokens=config.context_tokens,
            )
            self.node = node
            frames = FrameCodec(sealer, spec.hidden_size, config.max_frame_bytes, me=addr)
            timings = config.timings

            def connect(
                dispatch: Dispatch, watch: LinkWatch, tg: asyncio.TaskGroup, refusals: Refusals
            ) -> DataLinks:
                links = Links(http, dispatch, watch, tg, frames, refusals, timings.connect_timeout)
                return DelayedLinks(links, delays, tg, alarms) if delays else links

            seam = NodeSeam(node)
            service = ChainService(
                seam, model_dir, placement, spec, connect, events, profile.mem, node.clock,
                timings, config.speculate,
            )  # fmt: skip
            sockets = SocketServer(
                frames, service.refusals, lambda: seam.address, service.handle_frame, seam
            )
            self.service = service
            peer_gate = ConnectionGate(config.connections_per_host, config.connections)
            raws = None
            if raw is not None:
                raws = RawListener(
                    raw, frames, lambda: seam.address, service.handle_frame,
                    service.handle_now, seam.heard, service.refusals.note, peer_gate.admit,
                    peer_gate.release, config.timings.connect_timeout,
                    *([lambda link: LateReading(link, delays, alarms)] if delays else []),
                )  # fmt: skip
            codec: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            body_timeout = config.timings.body_timeout
            api = OpenAIApi(service.origin, codec, spec.name, body_timeout, config.context_tokens)
            self.gates = {
                "peer": peer_gate,
                "api": ConnectionGate(config.connections_per_host, config.connections),
            }
            metrics = Metrics(node, service, frames, self.gates)
            operator = OperatorApi(node, events, metrics, self.status, body_timeout)
            self.sealer = sealer
            peer_app = web.Application(
                client_max_size=MAX_REQUEST_BYTES,
                middlewares=[answer_delays(delays, alarms)] if delays else [],
            )
            peer_app.add_routes(control_routes(node, sealer, config.timings))
            peer_app.add_routes([web.get("/chain/ws", sockets.handle_ws)])
            guard = BrowserGuard.for_api(config.api_bind, config.api_allow_hosts)
            user_app = web.Application(
                client_max_size=MAX_REQUEST_BYTES,
                middlewares=[guard.middleware, _bearer(config.api_token), api.tokenizer_ready],
            )
            user_app.on_response_prepare.append(guard.on_prepare)
            user_app.add_routes(api.routes())
            user_app.add_routes(operator.routes())
            header_timeout = config.timings.header_timeout
            runners = [
                await serve(
                    peer_app, config.interface or "0.0.0.0", config.port, "peer",
                    self.gates["peer"], header_timeout,
                ),
            ]  # fmt: skip
            discovery = None
            try:
                runners.append(
                    # A caller that hangs up has its request cancelled (its answer stops).
                    await serve(
                        user_app, config.api_bind, config.api_port_or_default, "API",
                        self.gates["api"], header_timeout, handler_cancellation=True,
                    )
                )  # fmt: skip
                # Before anyone knows us: parts of these hold the GIL for a second on a slow
                # host, where a member's probes would go unanswered.
                await _prepare_model(model_dir, codec)
                if config.mdns:
                    host, _, port = addr.rpartition(":")
                    discovery = Discovery(
                        node_id,
                        host,
                        int(port),
                        config.interface,
                        sealer.fingerprint,
                        sealer.accepts_fingerprint,
                        _join(node),
                    )
                    await discovery.start()
                for seed in config.peers:
                    node.join(seed, configured=True)
                logger.info(
                    "peer %s up on %s, API on http://%s:%d (model %s)",
                    node_id, addr, config.api_bind, config.api_port_or_default, spec.name,
                )  # fmt: skip
                async with asyncio.TaskGroup() as tg:
                    running = tg.create_task(node.run())
                    tasks = [
                        tg.create_task(self._profile(node, model_dir)),
                        tg.create_task(service.run()),
                        tg.create_task(
                            rounds(
                                "load",
                                load_publisher(node, service),
                                node.loop_errors,
                                asyncio.sleep,
                            )
                        ),
                        tg.create_task(_chain_ready(node)),
                        # Two probe timeouts: a stall that long costs at least one probe.
                        tg.create_task(self.stalls.run(asyncio.sleep)),
                    ]
                    if raws is not None:
                        tasks.append(tg.create_task(raws.run()))
                    if discovery is not None:
                        tasks.append(
                            tg.create_task(
                                rounds(
                                    "mdns", discovery.resolve_one, node.loop_errors, asyncio.sleep
                                )
                            )
                        )
                    await self._stop.wait()
                    operator.close()
                    logger.info("shutting down: no new requests, moving our units to others")
                    await node.drain()
                    await service.origin.drain(timings.drain_timeout)
                    if not await service.hand_over(timings.hand_over_timeout):
                        logger.warning("leaving without handing over: no plan without this peer")
                    logger.info("leaving the mesh")
                    await node.stop(leave=True)
                    for task in tasks:
                        task.cancel()
                    await sockets.close()
                    await running
            finally:
                if discovery is not None:
                    await discovery.stop()
                for runner in runners:
                    await runner.cleanup()
                alarms.close()
        logger.info("peer %s stopped", node_id)

    async def _profile(self, node: ControlNode, model_dir: Any) -> None:
        """Measure this device on the model thread, then publish the profile."""
        from meshshard.model.profile import cached_quick_profile

        assert self.placement is not None
        try:
            result = await run_setup(
                cached_quick_profile, model_dir, self.placement, self.config.profile_folder
            )
        except Exception as e:  # a failed profile leaves the estimate in place
            logger.warning("profiling failed, keeping estimates: %s", e)
            return
        old = node.profiles[node.id]
        node.set_profile(
            replace(
                old,
                unit_ms=tuple(u.decode_ms for u in result.units),
                measured=True,
                batch_ms=tuple(zip(*(u.batch_ms for u in result.units), strict=True)),
            )
        )

    def status(self) -> dict[str, Any]:
        """The status object of `GET /status`, the dashboard and `meshshard status`."""
        assert self.node is not None
        spec = Speculation(*self.service.stats.per_pass()) if self.service else PLAIN
        status = report.status(self.node, spec)
        status |= {
            "version": __version__,
            "model": self.node.model,
            "uptime_s": round(time.time() - self._started, 1),
            "raw_port": self.raw_port,
            "loop_stalls": {"count": self.stalls.count, "longest_s": round(self.stalls.longest, 2)},
        }
        if self.service is not None and self.sealer is not None:
            status["security"] = {
                "mesh_key": self.sealer.fingerprint or None,
                "refused_messages": self.sealer.refused,
                "refused_frames": self.service.refusals.count,
                "refused_gossip": dict(self.node.refused),
                "loop_errors": dict(self.node.loop_errors + self.service.loop_errors),
                "refused_connections": {k: g.refused for k, g in self.gates.items()},
                "open_connections": {k: g.open for k, g in self.gates.items()},
            }
            status["origin"] = {
                "sessions": self.service.origin.open_sessions,
                "tokens_out": self.service.stats.tokens_out,
                "replays": self.service.stats.replays,
                "handoffs": self.service.stats.handoffs,
                "speculation": self.service.stats.speculation(),
            }
            status["admission"] = {
                "kv_tokens": self.service.follower.budget.tokens,
                "kv_reserved": self.service.follower.budget.reserved,
                "sessions": self.service.follower.budget.sessions,
                "refused": self.service.stats.busy,
            }
            status["kv"] = {
                "layers_sent": self.service.stats.kv_layers_sent,
                "layers_received": self.service.stats.kv_layers_received,
                "left_behind": len(self.service.follower.left_behind),
                "left_behind_bytes": self.service.follower.left_behind.nbytes(),
            }
            standby = self.service.follower.standby
            status["standby"] = {
                "units": [standby.start, standby.end] if standby else None,
                "used": self.service.stats.standbys_used,
            }
        stage = self.service.follower.stage if self.service else None
        status["stage"] = (
            {
                "units": [stage.shard.start, stage.shard.end],
                "epoch": [stage.epoch.term, stage.epoch.coordinator],
                "sessions": len(stage.shard.sessions),
                "steps": stage.steps,
                "batches": stage.batches,
                "holds": stage.schedule.holds,
                "split_steps": stage.costs.split_steps,
                "picks_moved": stage.first_head.picks_moved,
                "wave_rows": stage.first_head.wave_rows,
                "weight_bytes": stage.shard.weight_bytes(),
                "kv_bytes": stage.shard.kv_bytes(),
                "step_ms": round(stage.costs.step_ms, 3),
                # Wall time of all passes, and the CPU time of the thread that ran them: a CPU
                # quota or a busy machine shows as the first outgrowing the second.
                "forward_s": round(stage.forward_s, 3),
                "forward_cpu_s": round(stage.forward_cpu_s, 3),
                # Decode passes by rows, how many and their (moving) ms: how batches form.
                "passes": {str(rows): n for rows, n in sorted(stage.costs.passes.items())},
                "pass_ms": {str(r): round(ms, 2) for r, ms in sorted(stage.costs.pass_ms.items())},
                # ... and at a last stage, a lone answer's whose head is split (split_steps)
                # and a wave's whose head the first stage scores, by rows.
                "split_passes": {str(r): n for r, n in sorted(stage.costs.split_passes.items())},
                "split_ms": {
                    str(r): round(ms, 2) for r, ms in sorted(stage.costs.split_ms.items())
                },
            }
            if stage
            else None
        )
        if self.service is not None:
            status["measured"] = {
                "latency_ms": round(self.service.origin.meter.latency_ms, 3),
                "tokens_per_s": round(self.service.origin.meter.tokens_per_s(), 2),
            }
        return status


def _sealer(config: Config) -> Sealer:
    if config.insecure and config.secret_file is not None:
        raise MeshShardError("--secret-file and --insecure exclude each other")
    if config.insecure:
        logger.warning(
            "running WITHOUT a mesh key (--insecure): any host on the network can join this "
            "mesh, send it frames and read its activations"
        )
        return Sealer(None, config.mesh)
    if config.secret_file is None:
        raise MeshShardError(
            "no mesh key: create one with `meshshard keygen FILE`, copy it to every device and "
            "pass --secret-file FILE (or run with --insecure)"
        )
    keyring = Keyring.load(config.secret_file)
    logger.info("mesh %r, key %s", config.mesh, keyring.fingerprint)
    return Sealer(keyring, config.mesh)


def _bearer(token: str | None) -> Any:
    """API middleware: with a token, every request must carry it as a bearer token."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        # The dashboard page holds no data; its live feed cannot send headers (EventSource),
        # so the feed may carry the token as ?token=.
        if token is not None and request.path != "/":
            given = request.headers.get("Authorization", "")
            if request.path == "/events" and "token" in request.query:
                given = f"Bearer {request.query['token']}"
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response(
                    {"error": {"message": "a valid API token is required", "type": "auth"}},
                    status=401,
                )
        response: web.StreamResponse = await handler(request)
        return response

    return check


async def _prepare_model(model_dir: Any, codec: asyncio.Future[Any]) -> None:
    """Import the model's code, then load the tokenizer, on the model thread."""
    from meshshard.model.shard import import_code
    from meshshard.model.text import TextCodec

    with progress("importing the model's code and loading its tokenizer"):
        try:
            await run_imports(import_code, model_dir)
        except Exception as e:
            raise MeshShardError(f"cannot import the code of the model in {model_dir}: {e}") from e
        try:
            codec.set_result(await run_setup(TextCodec.load, model_dir))
        except Exception as e:  # the API says it, per request
            codec.set_exception(e)


async def _chain_ready(node: ControlNode) -> None:
    """Show the wait for the first ready chain (the mesh forming, shards loading)."""
    with progress("waiting for the chain to be ready"):
        while (plan := node.book.current) is None or not node.chain_ready(plan):
            await asyncio.sleep(0.2)


def _join(node: ControlNode) -> Any:
    def found(peer_id: str, addr: str) -> None:
        logger.debug("mDNS found %s at %s", peer_id, addr)
        node.join(addr)

    return found


def _default_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
