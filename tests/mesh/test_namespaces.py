"""Three peers on three network-namespace hosts joined by a bridge find each other by mDNS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.netns import Bridge, can_make_namespaces
from support.procs import Peer, wait_for_agreement

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces())),
]


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    net = Bridge(3).up()
    yield net
    net.down()
    assert net.leftovers() == []


def test_peers_in_namespaces_discover_each_other(bridge: Bridge, tmp_path: Path) -> None:
    peers = [
        Peer(
            f"host-{i}",
            7117,
            tmp_path,
            "--memory",
            "400MB",
            host=bridge.address(i),
            netns=host,
        ).start()
        for i, host in enumerate(bridge.hosts)
    ]
    try:
        view = wait_for_agreement(peers, 120, 0.5)
        assert view["coordinator"] == "host-2"
        addrs = {m["addr"] for m in view["members"]}
        assert addrs == {f"{bridge.address(i)}:7117" for i in range(3)}
    except AssertionError:
        raise AssertionError("\n\n".join(p.tail() for p in peers)) from None
    finally:
        for p in peers:
            p.kill()
