"""`meshshard up`'s flags reach the peer's Config (the daemon itself is not started here)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

import meshshard.daemon
from meshshard.cli import cli


class Recorder:
    configs: ClassVar[list[Any]] = []

    def __init__(self, config: Any) -> None:
        self.configs.append(config)

    def request_stop(self) -> None: ...

    async def run(self) -> None: ...


@pytest.mark.parametrize("args, context", [([], 2048), (["--context", "4096"], 4096)])
def test_the_context_the_plan_keeps_kv_for(
    monkeypatch: pytest.MonkeyPatch, args: list[str], context: int
) -> None:
    monkeypatch.setattr(meshshard.daemon, "Daemon", Recorder)
    Recorder.configs.clear()
    result = CliRunner().invoke(cli, ["up", "--insecure", "--no-mdns", *args])
    assert result.exit_code == 0, result.output
    assert [c.context_tokens for c in Recorder.configs] == [context]


def test_a_context_too_small_is_refused() -> None:
    result = CliRunner().invoke(cli, ["up", "--insecure", "--context", "8"])
    assert result.exit_code == 2 and "--context" in result.output
