"""A heterogeneous edge testbed on one machine, described by a TOML file in peers/.

    python tools/testbed.py up peers/lan-3.toml     # namespaces, bridge, cgroups, shaping, peers
    python tools/testbed.py ask peers/lan-3.toml "What is the capital of France?"
    python tools/testbed.py status peers/lan-3.toml
    python tools/testbed.py down peers/lan-3.toml   # or: down --all (also after a crash)

Each host is a network namespace joined to a bridge (in a namespace of its own) by a veth
pair, with an address in a private subnet that exists only inside those namespaces. Its peer
runs `meshshard up` under a cgroup v1 CPU quota (its share of a core) and memory limit. The
link's rate is shaped both ways with `tc tbf`; its one-way delay to the bridge is added by the
transport (MESHSHARD_TEST_DELAYS: this kernel has no netem). Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.netns import Bridge  # noqa: E402

from meshshard.config import API_PORT_OFFSET, parse_bytes  # noqa: E402
from meshshard.launch import PeerCommand  # noqa: E402
from meshshard.security import new_key, write_key_file  # noqa: E402

PREFIX = "mstb"  # namespaces, veths and cgroups of testbeds all start with this
STATE = Path("/run/meshshard-testbed")
CGROUP = Path("/sys/fs/cgroup")
PORT = 7117
# Short quota periods, so a slow host is slow steadily: a group idle for a while starts with its
# period's quota in hand and runs that much at full speed (14 layers under half a core: 30.8 ms
# back to back but 21.5 ms after 30 ms of rest at 10 ms periods; 29.4 and 29.6 ms at 4 ms).
# Shorter still costs: a whole core in 1 ms periods ran 50% slower than unlimited.
CFS_PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel's least quota; smaller shares get longer periods
RUNTIME_MB = 700  # what a peer process needs beside the shard it is offered for
# A 0.15-core host on a slow machine takes minutes to import, load and profile.
READY_TIMEOUT = 900
PROFILE_TIMEOUT = 300  # a peer's start and its profile, on a host of a quarter core


@dataclass(frozen=True)
class Host:
    name: str
    cpu: float  # cores
    offer: str  # memory offered to the mesh (`meshshard up --memory`)
    mbps: float  # link rate to the bridge, both ways
    delay_ms: float  # one-way delay to the bridge
    priority: int = 0
    memory: str | None = None  # cgroup memory limit; default: offer + RUNTIME_MB


@dataclass(frozen=True)
class Testbed:
    name: str
    hosts: tuple[Host, ...]
    model: str | None = None
    objective: str = "latency"

    @classmethod
    def load(cls, path: Path) -> Testbed:
        raw = tomllib.loads(path.read_text())
        hosts = tuple(Host(**h) for h in raw.get("hosts", []))
        if not hosts:
            raise SystemExit(f"error: {path} names no [[hosts]]")
        return cls(
            raw.get("name", path.stem), hosts, raw.get("model"), raw.get("objective", "latency")
        )

    @property
    def tag(self) -> str:
        return f"{PREFIX}{zlib.crc32(self.name.encode()) % 10**5:05d}"

    @property
    def subnet(self) -> str:
        return f"10.232.{zlib.crc32(self.name.encode()) % 250 + 1}"

    def namespace(self, i: int) -> str:
        return f"{self.tag}h{i}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def with_rate(self, host: str, mbps: float) -> Testbed:
        hosts = tuple(
            Host(**{**h.__dict__, "mbps": mbps}) if h.name == host else h for h in self.hosts
        )
        return Testbed(self.name, hosts, self.model, self.objective)


def up(tb: Testbed, objective: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Bring the testbed up; returns its state folder (logs, key, state.json)."""
    need_root()
    down(tb)
    state = STATE / tb.name
    state.mkdir(parents=True, exist_ok=True)
    key = state / "mesh.key"
    if not key.exists():
        write_key_file(key, new_key())
    pids = []
    try:
        net = Bridge(len(tb.hosts), tb.tag, tb.subnet).up()
        for i, host in enumerate(tb.hosts):
            shape(net.hosts[i], "eth0", host.mbps)  # host -> bridge
            shape(net.bridge, net.port(i), host.mbps)  # bridge -> host
            make_cgroup(tb, i, host)
        for i, host in enumerate(tb.hosts):
            pids.append(start_peer(tb, i, host, state, key, objective or tb.objective, extra))
            profiled(tb, i, pids[-1])
    except Exception:
        down(tb)
        raise
    (state / "state.json").write_text(json.dumps({"testbed": tb.name, "pids": pids}))
    return state


def profiled(tb: Testbed, i: int, pid: int, timeout: float = PROFILE_TIMEOUT) -> None:
    """Wait until host i's peer has its profile (kept, or measured now) before the next one
    starts. Devices apart do not see each other start; peers sharing this machine's cores do,
    and one profiling while the next ones import torch and read weights times its passes as
    they run then: lan-3 run 71's desk and laptop, profiled while the others started, priced
    a pass of one row 1.4x what it took serving. (A peer that exited is not waited for.)"""
    end = time.monotonic() + timeout
    while time.monotonic() < end and Path(f"/proc/{pid}").exists():
        me = status(tb, i) or {}
        if any(m["id"] == me.get("id") and m["measured"] for m in me.get("members", ())):
            return
        time.sleep(1)


def down(tb: Testbed | None) -> list[str]:
    """Stop the peers and remove namespaces and cgroups: of `tb`, or of every testbed."""
    need_root()
    tag = tb.tag if tb else PREFIX
    for controller in ("cpu", "memory"):
        for group in sorted((CGROUP / controller).glob(f"{tag}*")):
            for pid in (group / "cgroup.procs").read_text().split():
                kill_group(int(pid))
    if tb is not None and (tb_state := STATE / tb.name / "state.json").exists():
        for pid in json.loads(tb_state.read_text())["pids"]:
            kill_group(pid)
        tb_state.unlink()
    removed = []
    for name in namespaces(tag):
        for pid in run("ip", "netns", "pids", name).split():
            kill_group(int(pid))
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    for controller in ("cpu", "memory"):
        for group in sorted((CGROUP / controller).glob(f"{tag}*")):
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            removed.append(str(group))
    return removed


def leftovers(tb: Testbed | None = None) -> list[str]:
    tag = tb.tag if tb else PREFIX
    found = namespaces(tag)
    for controller in ("cpu", "memory"):
        found += [str(g) for g in (CGROUP / controller).glob(f"{tag}*")]
    return found


def start_peer(
    tb: Testbed, i: int, host: Host, state: Path, key: Path, objective: str, extra: tuple[str, ...]
) -> int:
    others = {tb.address(j): h.delay_ms for j, h in enumerate(tb.hosts) if j != i}
    delays = ",".join([f"self={host.delay_ms}"] + [f"{a}={ms}" for a, ms in others.items()])
    group = f"{tb.tag}h{i}"
    profiles = state / f"profiles-{host.name}-cpu{host.cpu}"
    peer = PeerCommand(
        host.name, PORT, tb.address(i), key,
        ("--memory", host.offer, "--priority", str(host.priority), "--threads", "1",
         "--objective", objective, "--profile-dir", str(profiles),
         *(["--model", tb.model] if tb.model else []), *extra),
        netns=tb.namespace(i),
        cgroups=[CGROUP / "cpu" / group, CGROUP / "memory" / group],
        env={"MESHSHARD_TEST_DELAYS": delays},
    )  # fmt: skip
    proc = peer.start(state / f"{host.name}.log", cwd=ROOT)
    return proc.pid


def make_cgroup(tb: Testbed, i: int, host: Host) -> None:
    group = f"{tb.tag}h{i}"
    cpu = CGROUP / "cpu" / group
    cpu.mkdir(exist_ok=True)
    period = max(CFS_PERIOD_US, round(MIN_QUOTA_US / host.cpu))
    (cpu / "cpu.cfs_period_us").write_text(str(period))
    (cpu / "cpu.cfs_quota_us").write_text(str(round(host.cpu * period)))
    memory = CGROUP / "memory" / group
    memory.mkdir(exist_ok=True)
    limit = parse_bytes(host.memory) if host.memory else parse_bytes(host.offer) + RUNTIME_MB * 1e6
    (memory / "memory.limit_in_bytes").write_text(str(int(limit)))


def shape(ns: str, dev: str, mbps: float) -> None:
    # A burst of at least one MTU and of ~4 ms at the rate keeps tbf accurate at any rate.
    burst = max(4096, int(mbps * 1e6 / 8 * 0.004))
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
         "rate", f"{mbps}mbit", "burst", str(burst), "latency", "200ms"],
        check=True, capture_output=True,
    )  # fmt: skip


def in_host(
    tb: Testbed, i: int, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `meshshard ARGS` inside host i's namespace (outside its cgroup: a client)."""
    cmd = ["ip", "netns", "exec", tb.namespace(i), sys.executable, "-m", "meshshard", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def in_share(tb: Testbed, i: int, *args: str) -> subprocess.Popen[str]:
    """Python running `args` in host i's namespace and CPU share (not its memory limit: its
    peer holds that), one thread, its output piped."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", tb.namespace(i), sys.executable, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    # `ip netns exec` execs the command (same pid) and mounts its own /sys: the process is
    # put in the CPU share from here, before it has loaded a model.
    (CGROUP / "cpu" / tb.namespace(i) / "cgroup.procs").write_text(str(proc.pid))
    return proc


def api_url() -> str:
    return f"http://127.0.0.1:{PORT + API_PORT_OFFSET}"


def status(tb: Testbed, i: int = 0) -> dict[str, Any] | None:
    out = in_host(tb, i, "status", "--peer", api_url(), "--json", timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait_ready(tb: Testbed, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """The coordinator's status once its chain is ready and every host is a member."""
    end = time.monotonic() + timeout
    state = STATE / tb.name / "state.json"
    pids = json.loads(state.read_text())["pids"] if state.exists() else []
    while time.monotonic() < end:
        if pids and not any(Path(f"/proc/{pid}").exists() for pid in pids):
            raise SystemExit(f"error: every {tb.name} peer exited (logs in {STATE / tb.name})")
        for i in range(len(tb.hosts)):
            s = status(tb, i)
            alive = sum(m["state"] == "alive" for m in s["members"]) if s else 0
            if s and s["chain_ready"] and s["coordinator"] == s["id"] and alive == len(tb.hosts):
                return s
        time.sleep(1)
    raise SystemExit(f"error: the {tb.name} chain was not ready within {timeout:.0f} s "
                     f"(logs in {STATE / tb.name})")  # fmt: skip


def namespaces(tag: str) -> list[str]:
    lines = run("ip", "netns", "list").splitlines()
    return [line.split()[0] for line in lines if line.startswith(tag)]


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("error: the testbed needs root (network namespaces, cgroups, tc)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("error: the testbed needs iproute2 (ip, tc)")
    if not (CGROUP / "cpu").is_dir() or not (CGROUP / "memory").is_dir():
        raise SystemExit("error: the testbed needs cgroup v1 cpu and memory controllers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "ask"):
        p = sub.add_parser(name)
        p.add_argument("testbed", type=Path, nargs="?" if name == "down" else None)
        if name == "down":
            p.add_argument("--all", action="store_true", help="every testbed, also after a crash")
        if name == "ask":
            p.add_argument("question")
            p.add_argument("--max-tokens", type=int, default=64)
        if name == "up":
            p.add_argument("--objective", choices=("latency", "throughput"))
    args = parser.parse_args()
    tb = Testbed.load(args.testbed) if args.testbed else None
    match args.command:
        case "up":
            assert tb is not None
            state = up(tb, args.objective)
            s = wait_ready(tb)
            chain = " -> ".join(
                f"{x['device']}[{x['start']}:{x['end']})" for x in s["plan"]["stages"]
            )
            print(f"{tb.name} up ({len(tb.hosts)} hosts on {tb.subnet}.0/24, logs in {state})")
            latency = s["plan"]["latency_ms"]
            print(f"plan {s['plan']['epoch']}: {chain}, predicted {latency:.1f} ms/token")
        case "down":
            if tb is None and not args.all:
                raise SystemExit("error: name a testbed, or --all")
            down(tb)
            left = leftovers(tb)
            print("down" if not left else f"left behind: {left}")
        case "status":
            assert tb is not None
            print(json.dumps(status(tb), indent=1))
        case "ask":
            assert tb is not None
            out = in_host(tb, 0, "ask", args.question, "--peer", api_url(),
                          "--max-tokens", str(args.max_tokens))  # fmt: skip
            print(out.stdout.strip() or out.stderr.strip())
            sys.exit(out.returncode)


if __name__ == "__main__":
    main()
