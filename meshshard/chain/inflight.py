"""The answers whose frames went out on one data-plane socket, to tell their origins should it
close under them.

A frame written to a socket has only reached its buffers: if the socket then closes (the
other side refused a message, missed a heartbeat, its kernel reset the connection), the
frames still in them are gone, and nobody says so. The answer would wait for a token that
never comes, until its step timeout fails it. So each socket remembers, for every answer it
carried, the origin and the latest try, and when it closes under them each origin hears
"internal" for that try, as when a send fails: it feeds the answer again (recovery.py). An
answer whose frames did arrive pays one needless replay; none loses its tokens. An answer
that is over (its drop came) is forgotten: a peer's every graceful leave closed sockets that
had carried hundreds of finished answers, and each was "lost" in a warning, its origin told.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from meshshard.types import Epoch
from meshshard.wire import (
    DataFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    StepFrame,
    TokenFrame,
)

MOST_ANSWERS = 1024  # remembered per socket, least recently carried forgotten first


def waiting(addr: str, frame: DataFrame) -> tuple[str, ErrorFrame] | None:
    """Who waits on `frame`, sent to `addr` (its answer's origin), and the error that tells
    it the frame may be lost; None for frames no answer waits on (a drop; a split step's
    pick, which its step's error covers)."""
    match frame:
        case TokenFrame() | ErrorFrame():  # to the origin itself
            return addr, _internal(frame.epoch, frame.session, frame.step, frame.attempt)
        case HandoffDone():
            return addr, _internal(frame.epoch, frame.session, 0, frame.attempt)
        case StepFrame():
            return frame.origin, _internal(frame.epoch, frame.session, frame.step, frame.attempt)
        case KVFrame() | HandoffRequest():
            return frame.origin, _internal(frame.epoch, frame.session, 0, frame.attempt)
    return None


def _internal(epoch: Epoch, session: str, step: int, attempt: int) -> ErrorFrame:
    return ErrorFrame(epoch, session, step, ErrorCode.INTERNAL, "", attempt)


class InFlight:
    def __init__(self) -> None:
        self._carried: OrderedDict[tuple[str, str], ErrorFrame] = OrderedDict()

    def sent(self, addr: str, frame: DataFrame) -> None:
        """`frame` was written to the socket to `addr`."""
        if (waits := waiting(addr, frame)) is None:
            return
        origin, error = waits
        key = (origin, error.session)
        self._carried.pop(key, None)  # to the newest end
        self._carried[key] = error
        while len(self._carried) > MOST_ANSWERS:
            self._carried.popitem(last=False)

    def forget(self, session: str) -> None:
        for key in [k for k in self._carried if k[1] == session]:
            del self._carried[key]

    def lost(self, why: str) -> list[tuple[str, ErrorFrame]]:
        """The socket closed under its frames: an error for each answer it carried, with
        the origin to send it to. Forgets them."""
        errors = [(origin, replace(e, message=why)) for (origin, _), e in self._carried.items()]
        self._carried.clear()
        return errors
