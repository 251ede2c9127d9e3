"""Real `meshshard up` processes for tests: start, wait, query, kill, and always clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshshard.config import API_PORT_OFFSET
from meshshard.launch import PeerCommand
from meshshard.security import new_key, write_key_file

ROOT = Path(__file__).resolve().parents[2]


def mesh_key(folder: Path) -> Path:
    """The mesh key shared by the peers a test starts with logs in `folder`."""
    path = folder / "mesh.key"
    if not path.exists():
        write_key_file(path, new_key())
    return path


class Peer:
    def __init__(
        self,
        name: str,
        port: int,
        logs: Path,
        *extra: str,
        host: str = "127.0.0.1",
        netns: str | None = None,
        timings: str = "test",
    ) -> None:
        self.name, self.port, self.host, self.netns = name, port, host, netns
        self.log = logs / f"{name}.log"
        own_key = "--secret-file" in extra or "--insecure" in extra
        self.command = PeerCommand(
            name, port, host, None if own_key else mesh_key(logs),
            ("--timings", timings, *extra), netns,
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The user API (on loopback, inside the peer's namespace if it has one)."""
        return f"http://127.0.0.1:{self.port + API_PORT_OFFSET}"

    @property
    def addr(self) -> str:
        """The peer endpoints (gossip, /chain/ws)."""
        return f"{self.host}:{self.port}"

    def start(self) -> Peer:
        self.proc = self.command.start(self.log, cwd=ROOT)
        return self

    def status(self, timeout: float = 3.0) -> dict[str, Any] | None:
        if self.netns:
            out = subprocess.run(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "meshshard", "status"]
                + ["--peer", self.url, "--json"],
                capture_output=True,
                timeout=timeout + 10,
                cwd=ROOT,
            )
            return json.loads(out.stdout) if out.returncode == 0 else None
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=timeout) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except OSError:
            return None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as Ctrl-C would; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def agreement(peers: list[Peer]) -> dict[str, Any] | None:
    """The common view if every peer sees the same live members, coordinator and plan."""
    views = [p.status() for p in peers]
    if any(v is None for v in views):
        return None
    names = {p.name for p in peers}
    first = views[0]
    assert first is not None
    for v in views:
        assert v is not None
        alive = {m["id"] for m in v["members"] if m["state"] == "alive"}
        if alive != names or v["coordinator"] != first["coordinator"]:
            return None
        if v["plan"] is None or v["plan"] != first["plan"]:
            return None
        if v["plan"]["epoch"][1] != v["coordinator"]:
            return None
    return first


@contextmanager
def chain_of(peers: list[Peer], stages: int) -> Iterator[list[Peer]]:
    """The peers started, once the first sees a ready chain of `stages` or more; every one
    killed on the way out, whatever happened."""
    try:
        for p in peers:
            p.start()
        wait_for_chain(peers[0], stages)
        yield peers
    finally:
        for p in peers:
            p.kill()


def wait_for_chain(peer: Peer, min_stages: int, timeout: float = 180) -> None:
    """Wait until `peer` sees a ready chain of at least `min_stages` stages."""

    def ready() -> bool:
        s = peer.status()
        return bool(s and s.get("chain_ready") and len(s["plan"]["stages"]) >= min_stages)

    wait_for(ready, timeout, f"a chain of {min_stages}+ stages", 0.2)


def wait_for_agreement(peers: list[Peer], timeout: float, interval: float = 0.1) -> dict[str, Any]:
    """Wait until the peers agree; returns the agreed view (not a later, possibly flapping one)."""
    seen: list[dict[str, Any]] = []

    def agreed() -> bool:
        view = agreement(peers)
        if view is not None:
            seen.append(view)
        return view is not None

    wait_for(agreed, timeout, "agreement", interval)
    return seen[-1]


def settled(peers: list[Peer]) -> dict[str, Any]:
    """The agreed view once every link is measured and the plan has stood for a while (the
    first measurements may move units, legitimately)."""
    links = len(peers) * (len(peers) - 1)
    seen: list[tuple[Any, float]] = []

    def still() -> bool:
        view = wait_for_agreement(peers, 180)
        epoch = view["plan"]["epoch"]
        if len(view["links"]) < links or not seen or seen[-1][0] != epoch:
            seen.append((epoch, time.monotonic()))
            return False
        return time.monotonic() - seen[-1][1] > 3

    wait_for(still, 120, "a settled plan", 0.5)
    return wait_for_agreement(peers, 30)
