"""`meshshard demo`: a local mesh of real peers on loopback, one question, a clean shutdown.

Each peer offers too little memory to hold the model alone, so the plan must split it.
mDNS is bound to 127.0.0.1: nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from meshshard.client import ask, fetch_status
from meshshard.config import API_PORT_OFFSET
from meshshard.errors import MeshShardError
from meshshard.launch import PeerCommand
from meshshard.security import new_key, write_key_file

READY_TIMEOUT = 180.0


def run_demo(
    question: str, peers: int, base_port: int, memory: str, max_tokens: int, keep: bool = False
) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    ports = [base_port + i for i in range(peers)]
    urls = [f"http://127.0.0.1:{p + API_PORT_OFFSET}" for p in ports]
    _check_ports_free([*ports, *(p + API_PORT_OFFSET for p in ports)])
    logs = Path(tempfile.mkdtemp(prefix="meshshard-demo-"))
    key = logs / "mesh.key"  # a fresh mesh key, shared by the demo's peers only
    write_key_file(key, new_key())
    click.echo(
        f"starting {peers} peers on 127.0.0.1:{base_port}..{base_port + peers - 1} (logs in {logs})"
    )
    answered = False
    try:
        for i in range(peers):
            name = f"demo-{chr(ord('a') + i)}"
            extra = ("--memory", memory, "--threads", "1")
            peer = PeerCommand(name, base_port + i, "127.0.0.1", key, extra)
            procs.append(peer.start(logs / f"demo-{i}.log"))
        status = _wait_ready(urls, procs, logs)
        plan = status["plan"]
        chain = " -> ".join(
            f"{s['device']} (units {s['start']}..{s['end'] - 1})" for s in plan["stages"]
        )
        click.echo(f"chain ready, epoch {plan['epoch'][0]}/{plan['epoch'][1]}: {chain}")
        if not keep:
            click.echo(f"dashboard: {urls[0]}/ while it runs (--keep leaves the mesh up after)")
        click.echo(f"\nQ: {question}\nA: ", nl=False)
        result = ask(
            urls[0],
            question,
            max_tokens=max_tokens,
            temperature=0.0,
            seed=None,
            system=None,
            on_text=lambda piece: click.echo(piece, nl=False),
        )
        click.echo("\n")
        click.echo(
            f"{result['completion_tokens']} tokens, first after {result['ttft_s']:.2f} s, "
            f"{result['tokens_per_s']:.1f} tokens/s "
            f"(the planner predicted {1000 / plan['latency_ms']:.1f} tokens/s for one answer, "
            f"{plan['latency_ms']:.1f} ms/token)"
        )
        answered = True
        if keep:
            click.echo(f"the mesh stays up: dashboard at {urls[0]}/ ; Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in procs):
                    time.sleep(0.5)
    finally:
        click.echo("stopping the peers")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        _tidy(logs, key, answered and all(p.returncode == 0 for p in procs))


def _tidy(logs: Path, key: Path, clean: bool) -> None:
    """The key dies with its mesh; the logs stay only where something went wrong."""
    key.unlink(missing_ok=True)
    if clean:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        click.echo(f"the peers' logs stay in {logs}", err=True)


def _check_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket() as s:
            # As the peers' servers bind: connections of a demo that just ended (TIME_WAIT)
            # must not make a free port look taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise MeshShardError(f"port {port} is in use; pick another --port") from None


def _wait_ready(
    urls: list[str], procs: list[subprocess.Popen[bytes]], logs: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT
    with click.progressbar(length=3, label="waiting for the chain", show_eta=False) as bar:
        phase = 0
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise MeshShardError(f"a peer exited with code {p.returncode}; see {logs}")
            try:
                status = fetch_status(urls[0], timeout=2)
            except MeshShardError:
                time.sleep(0.3)
                continue
            alive = sum(m["state"] == "alive" for m in status["members"])
            reached = 1 + (alive == len(urls)) + bool(status.get("plan"))
            if reached > phase:
                bar.update(reached - phase)
                phase = reached
            if status.get("chain_ready"):
                bar.update(3 - phase)
                return status
            time.sleep(0.2)
    raise MeshShardError(f"the chain was not ready within {READY_TIMEOUT:.0f} s; see {logs}")
