"""Network namespaces joined by a bridge (in a namespace of its own): test hosts whose
traffic, mDNS included, never leaves them. Needs root; always torn down."""

from __future__ import annotations

import os
import random
import shutil
import subprocess


def can_make_namespaces() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


class Bridge:
    """Hosts `{tag}h{i}` at `{subnet}.{i+1}`, each joined by a veth pair (`eth0` in the host,
    `p{i}` at the bridge) to a bridge in namespace `{tag}br`. Random tag and subnet unless
    given (the testbed names its own)."""

    def __init__(self, hosts: int, tag: str | None = None, subnet: str | None = None) -> None:
        self.tag = tag or f"ms{random.randrange(16**5):05x}"
        self.bridge = f"{self.tag}br"
        self.hosts = [f"{self.tag}h{i}" for i in range(hosts)]
        self.subnet = subnet or f"10.231.{random.randrange(256)}"

    def port(self, i: int) -> str:
        """Host i's end of its link at the bridge."""
        return f"p{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def up(self) -> Bridge:
        try:
            self._ip("netns", "add", self.bridge)
            self._ip("-n", self.bridge, "link", "set", "lo", "up")
            self._ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                port = self.port(i)
                self._ip("netns", "add", host)
                self._ip("-n", host, "link", "set", "lo", "up")
                self._ip(
                    "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                    "netns", self.bridge,
                )  # fmt: skip
                self._ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                self._ip("-n", host, "link", "set", "eth0", "up")
                self._ip("-n", host, "route", "add", "224.0.0.0/4", "dev", "eth0")
                self._ip("-n", self.bridge, "link", "set", port, "master", "br0")
                self._ip("-n", self.bridge, "link", "set", port, "up")
        except Exception:
            self.down()
            raise
        return self

    def down(self) -> None:
        for ns in [*self.hosts, self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def leftovers(self) -> list[str]:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in names.splitlines() if line.startswith(self.tag)]

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)
