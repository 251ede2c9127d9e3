"""The testbed's transport delay: parsed from its variable, one way per end of a link."""

from __future__ import annotations

import pytest

from meshshard.delays import ENV, Delays


def test_a_message_waits_both_ends_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "self=5, 10.0.0.2=20,10.0.0.3=0.5")
    d = Delays.from_env()
    assert d.to("10.0.0.2:7117") == pytest.approx(0.025)
    assert d.to("10.0.0.3") == pytest.approx(0.0055)
    assert d.to("10.0.0.9:1") == pytest.approx(0.005)  # a host not listed: our end only


def test_unset_means_no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert Delays.from_env().to("10.0.0.2:7117") == 0.0
