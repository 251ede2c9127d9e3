"""mDNS discovery with zeroconf: announce ourselves, hand every peer found to membership.

mDNS never decides liveness (records live for minutes and a crashed peer sends no goodbye):
it only introduces addresses. Bound to the interfaces the user names, and only those.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshshard.wire import PROTOCOL

logger = logging.getLogger(__name__)

SERVICE = "_meshshard._tcp.local."
LOOKUP_MS = 3000


class Discovery:
    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        interface: str | None,
        fingerprint: str,
        accepts: Callable[[str], bool],
        on_peer: Callable[[str, str], None],
    ) -> None:
        self.node_id, self.host, self.port = node_id, host, port
        self.interface = interface
        self.fingerprint = fingerprint  # of our mesh key: peers with another key ignore us
        self._accepts = accepts
        self._on_peer = on_peer
        self._names: asyncio.Queue[str] = asyncio.Queue(maxsize=1024)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        interfaces: list[str] | object = [self.interface] if self.interface else None
        kwargs = {"interfaces": interfaces} if interfaces else {}
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only, **kwargs)  # type: ignore[arg-type]
        self._info = AsyncServiceInfo(
            SERVICE,
            f"{self.node_id}.{SERVICE}",
            addresses=[socket.inet_aton(self.host)],
            port=self.port,
            properties={
                "id": self.node_id,
                "v": str(PROTOCOL),
                "port": str(self.port),
                "fp": self.fingerprint,
            },
            server=f"{self.node_id}.local.",
        )
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._changed])
        logger.info("announcing %s on %s:%d", self.node_id, self.host, self.port)

    async def resolve_one(self) -> None:
        """Resolve the next name the browser reports (run it in a loop)."""
        name = await self._names.get()
        if self._zc is None:
            return
        info = await self._zc.async_get_service_info(SERVICE, name, LOOKUP_MS)
        if info is not None:
            self._found(info)

    async def stop(self) -> None:
        """Cancel browsing, then say goodbye (unregister) and close the sockets."""
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
        self._zc = self._browser = None

    def _changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        wanted = state_change in (ServiceStateChange.Added, ServiceStateChange.Updated)
        if wanted and name != f"{self.node_id}.{SERVICE}" and not self._names.full():
            self._names.put_nowait(name)

    def _found(self, info: AsyncServiceInfo) -> None:
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        if props.get("id") in (None, self.node_id) or props.get("v") != str(PROTOCOL):
            return
        if not self._accepts(props.get("fp", "")):
            logger.debug("ignoring %s: another mesh key", props.get("id"))
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            return
        self._on_peer(props["id"], f"{addresses[0]}:{info.port}")
