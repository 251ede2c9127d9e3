"""The two lanes of a link to a peer: which socket a frame goes by, the pieces a frame too
large for one goes in, and how fast a prompt may leave by its lane.

Two sockets go to each peer: one for bulk (a prompt's activations, a feed after a replay, a
handed-off cache, a session's drop) and one for the rest (decode steps, tokens, errors). On
one socket a step's few kilobytes would wait behind every byte of a prompt sent before it:
on a 20 Mbit/s link a 2,000-token prompt holds the socket for about 2 s, and every answer
decoding through that link would stall as long. A session's frames cannot overtake each
other across the two: its next step is sent only once its prompt has come round the chain
as a token, and its drop goes behind its prompt.
"""

from __future__ import annotations

import itertools
import socket
import sys
from dataclasses import replace

from meshshard.chain.tensors import positions, rows
from meshshard.wire import DataFrame, DropFrame, KVFrame, StepFrame, encode_frame
from meshshard.wire.checks import on_loopback

BULK, STEPS = "bulk", "steps"  # a link's two sockets

_HEADER_ROOM = 4096  # more than a step's fields take encoded, beside its tensor
# A prompt's activations leave at this share of the link's measured rate, paced by the kernel:
# sent as fast as TCP goes, they fill a slow link's queue (or its drops) ahead of the decode
# steps' frames on the other socket, and a step waits about 200 ms more (campus, 20 Mbit/s:
# gaps 2.5-4.1x the usual unpaced, 1.7-2.3x paced, docs/experiments/campus-pacing.txt).
PACE_SHARE = 0.8
# Python passes the option as a C int; a link whose pace would pass it (17 Gbit/s, measured
# past 21: a veth pair, a probe timed on an idle burst) has no queue a prompt could fill.
MAX_PACE = 2**31 - 1
UNPACED = -1  # the kernel's ~0U
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47 if sys.platform == "linux" else 0)


def pace_rate(addr: str, mbps: float) -> int:
    """Bytes/s to pace prompts to the peer at `addr` over a link measured at `mbps`; 0:
    unpaced. Never past MAX_PACE, and never on loopback: there is no network queue there for
    a prompt to fill, and what a probe measures is the two ends' CPU, which a busy host pulls
    far below what the socket moves."""
    rate = int(mbps * 1e6 / 8 * PACE_SHARE)
    return 0 if on_loopback(addr) or rate > MAX_PACE else rate


def lane(frame: DataFrame) -> str:
    """The socket a frame goes by: bulk for a prompt's (or feed's) rows and handed-off caches,
    and for a session's drop, which must not overtake its prompt (the stage would then start
    the session after forgetting it, and hold its cache until it idles out)."""
    if isinstance(frame, KVFrame | DropFrame):
        return BULK
    if isinstance(frame, StepFrame) and frame.tensor.shape[0] - len(frame.draft) > 1:
        return BULK
    return STEPS


def fitted(frame: DataFrame, most: int) -> list[DataFrame]:
    """`frame` as frames of at most `most` bytes encoded. A step of many rows (a long
    prompt's activations on a large model, or under a low --max-frame) goes as steps of
    consecutive rows, which the next stage joins again; only the last samples, drafts and
    feeds the chain on, as a stage's slices do (the rows it samples stay together in it). A
    layer's handed-off cache goes as pieces of consecutive positions, each appended to the
    last; only the last piece of the last layer is `final`. Anything else, or what cannot be
    cut to fit, goes whole (and is refused whole)."""
    match frame:
        case StepFrame() if len(frame.tensor.data) + _HEADER_ROOM > most:
            total = frame.tensor.shape[0]
            no_rows = replace(frame, tensor=rows(frame.tensor, 0, 0))
            per = _per_piece(no_rows, len(frame.tensor.data), total, most)
            last = max(len(frame.draft) + 1, per)
            if per < 1 or last >= total:
                return [frame]
            head = replace(frame, sample=False, draft=())
            cuts = [*range(0, total - last, per), total - last, total]
            return [
                replace(
                    head if b < total else frame,
                    start=frame.start + a,
                    tensor=rows(frame.tensor, a, b),
                )
                for a, b in itertools.pairwise(cuts)
            ]
        case KVFrame() if len(frame.keys.data) + len(frame.values.data) + _HEADER_ROOM > most:
            total = frame.keys.shape[2]
            none_held = replace(
                frame, keys=positions(frame.keys, 0, 0), values=positions(frame.values, 0, 0)
            )
            size = len(frame.keys.data) + len(frame.values.data)
            per = _per_piece(none_held, size, total, most)
            if per < 1 or per >= total:
                return [frame]
            return [
                replace(
                    frame,
                    start=frame.start + a,
                    keys=positions(frame.keys, a, b),
                    values=positions(frame.values, a, b),
                    final=frame.final and b == total,
                )
                for a, b in itertools.pairwise([*range(0, total, per), total])
            ]
    return [frame]


def _per_piece(empty: DataFrame, size: int, count: int, most: int) -> int:
    """How many of `count` rows or positions (`size` bytes together) fit in a frame of `most`
    bytes beside the fields of `empty`, the frame with none."""
    each = size // count if count else 0
    return (most - len(encode_frame(empty)) - 16) // each if each else 0
