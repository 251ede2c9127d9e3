"""Starting `meshshard up` as a process of its own: the one launcher behind the demo, the
tests and the namespace testbed, so they all run a peer the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PeerCommand:
    name: str
    port: int
    host: str = "127.0.0.1"  # bound and announced; mDNS stays on it
    key: Path | None = None  # the mesh key file; None: run --insecure only if asked in `extra`
    extra: Sequence[str] = ()  # any other flags of `meshshard up`
    netns: str | None = None  # run inside this network namespace
    cgroups: Sequence[Path] = ()  # join these cgroups first (inside a namespace /sys differs)
    env: Mapping[str, str] = field(default_factory=dict)  # on top of ours

    def argv(self) -> list[str]:
        up = [
            sys.executable, "-m", "meshshard", "up", "--name", self.name,
            "--port", str(self.port), "--interface", self.host,
            *(["--secret-file", str(self.key)] if self.key is not None else []), *self.extra,
        ]  # fmt: skip
        if self.netns:
            up = ["ip", "netns", "exec", self.netns, *up]
        if self.cgroups:
            joins = " && ".join(f"echo $$ > {group}/cgroup.procs" for group in self.cgroups)
            up = ["sh", "-c", f'{joins} && exec "$@"', "sh", *up]
        return up

    def start(self, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """The peer's process, in a session of its own, writing to `log`."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=os.environ | dict(self.env),
                start_new_session=True,
            )
