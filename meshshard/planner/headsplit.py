"""How much of the head the first stage scores for a lone answer's step, and whether it
scores a whole wave's.

One answer alone keeps one stage busy at a time; the head (SmolLM2's widest matrix, a fifth of
a token's work) is the last thing a step computes before its token goes to the first stage,
which waits idle. Where the model ties its embedding to the head, the first stage holds the
head's matrix already: the last stage can send its normed hidden state there and score the
rest of the vocabulary while the first stage scores its share, and the better of the two
picks is the token (chain/picks.py). That pays where the share's time saved outweighs the
hidden state's trip (a few KB, where a token is 8 bytes) and one more message.

Answers that go round in one wave keep the first stage idle too while the last one runs;
in several, a first stage faster than the last has time to spare each round. There the whole
head of a wave's rows, scored in one product at the first stage, takes the head off a slower
last stage (lan-3's laptop, half a core, scores it in twice the desk's time), for the rows'
trip there in place of their tokens'. No share: each side's product of a wave's rows costs a
good part of the whole one's, and the last stage would send a pick a row.

Pure: the shares both stages finish at the same time by, from profiled head times and the
link between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshshard.model.batching import BATCHES, MAX_BATCH
from meshshard.planner.cost import Stage
from meshshard.planner.flow import Pace, at_size, profiled
from meshshard.planner.instance import Instance

# A split must save this share of the head's time at the last stage: less is within what a
# hop's time varies by.
MIN_SAVING = 0.1


def head_share(
    inst: Instance, stages: Sequence[Stage], pace: Mapping[str, Pace] | None = None
) -> float:
    """The share of the vocabulary the first stage scores (0: the last stage scores it all).
    pace: per device, its passes as measured serving over what its profile says."""
    return _split(inst, stages, pace)[0]


def head_saving_ms(
    inst: Instance,
    stages: Sequence[Stage],
    pace: Mapping[str, Pace] | None = None,
    batch_ms: Mapping[str, Sequence[Sequence[float]]] | None = None,
    share: float | None = None,
) -> tuple[float, ...]:
    """What the split takes off a lone answer's pass of one row, then of each of BATCHES rows
    (a pass verifying a draft splits at the same share), in ms; zeros where there is no
    split. batch_ms: per device, per size in BATCHES, per unit, as profiles time them
    (without it, a head of k rows costs k heads: no gain from batching). share: the one the
    stages run (a plan's, chosen on the paces of its day), else the best one now."""
    if share is None:
        share, _ = _split(inst, stages, pace)
    if not share:
        return (0.0,) * (1 + len(BATCHES))
    first, last = stages[0], stages[-1]
    link = inst.link(last.device, first.device)
    heads_last, heads_first = (_heads(inst, d, pace, batch_ms) for d in (last.device, first.device))
    out = []
    for k, rows in enumerate((1, *BATCHES)):
        send = link.hop_ms(rows * inst.units[-2].out_bytes)
        back = link.hop_ms(rows * inst.return_bytes)
        out.append(_saving(share, heads_last[k], heads_first[k], send, back))
    return tuple(out)


def wave_head_ms(
    inst: Instance,
    stages: Sequence[Stage],
    pace: Mapping[str, Pace] | None = None,
    batch_ms: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Where the first stage scores a wave's whole head, for a wave of each of BATCHES rows:
    what the last stage's pass sheds (its head of those rows and their tokens' hop, less the
    rows' normed hidden states' hop), and what the first stage's pass takes on (its head of
    them), in ms. Zeros where the head cannot move."""
    none = (0.0,) * len(BATCHES)
    if not _ends_apart(inst, stages):
        return none, none
    first, last = stages[0], stages[-1]
    link = inst.link(last.device, first.device)
    heads_last, heads_first = (_heads(inst, d, pace, batch_ms) for d in (last.device, first.device))
    cut = []
    for k, rows in enumerate(BATCHES, start=1):
        send = link.hop_ms(rows * inst.units[-2].out_bytes)
        back = link.hop_ms(rows * inst.return_bytes)
        cut.append(heads_last[k] + back - send)
    return tuple(cut), tuple(heads_first[1:])


def wave_saving_ms(
    inst: Instance,
    stages: Sequence[Stage],
    pace: Mapping[str, Pace] | None = None,
    batch_ms: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> tuple[float, ...]:
    """What a one-wave round saves where the first stage scores the wave's whole head, for a
    wave of each of BATCHES rows, in ms (`wave_head_ms`: what the last stage sheds less what
    the first takes on). Negative where the first stage is the slower at it."""
    cut, added = wave_head_ms(inst, stages, pace, batch_ms)
    return tuple(c - a for c, a in zip(cut, added, strict=True))


def wave_head(
    inst: Instance,
    stages: Sequence[Stage],
    sessions: int,
    pace: Mapping[str, Pace] | None = None,
    batch_ms: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> bool:
    """Whether the first stage should score the head of a wave of `sessions` answers: where
    that saves MIN_SAVING of the last stage's head of the wave's rows, or more."""
    if sessions < 2 or not _ends_apart(inst, stages):
        return False
    rows = min(sessions, MAX_BATCH)
    saving = at_size(rows, 0.0, wave_saving_ms(inst, stages, pace, batch_ms))
    heads = _heads(inst, stages[-1].device, pace, batch_ms)
    return saving >= MIN_SAVING * at_size(rows, heads[0], heads[1:])


def _ends_apart(inst: Instance, stages: Sequence[Stage]) -> bool:
    """Whether the chain's first and last stages are two devices, the first from the
    embedding on and the last to the head."""
    if len(stages) < 2 or inst.n < 2:
        return False
    first, last = stages[0], stages[-1]
    return first.device != last.device and first.start == 0 and last.end == inst.n


def _heads(
    inst: Instance,
    device: str,
    pace: Mapping[str, Pace] | None,
    batch_ms: Mapping[str, Sequence[Sequence[float]]] | None,
) -> tuple[float, ...]:
    """The device's head for a pass of one row, then of each of BATCHES rows, as the flow
    model prices the head unit's passes (flow.profiled), at the device's pace."""
    units = inst.device(device).ms
    one, several = profiled(units, (batch_ms or {}).get(device) or (), len(units) - 1, len(units))
    scale = (pace or {}).get(device, Pace())
    return (one * scale.one, *(ms * scale.several for ms in several))


def _saving(share: float, head_last: float, head_first: float, send: float, back: float) -> float:
    """A pass's time at the last stage whole (its head, then the token's hop) less its time
    split: the later of the two shares' ends. Negative where the hidden states' trip costs
    more than the share saves (a long draft on a slow link)."""
    return head_last + back - max(send + share * head_first, (1 - share) * head_last + back)


def _split(
    inst: Instance, stages: Sequence[Stage], pace: Mapping[str, Pace] | None
) -> tuple[float, float]:
    """The first stage's share, and the ms it saves a round of one row."""
    if not _ends_apart(inst, stages):
        return 0.0, 0.0
    first, last = stages[0], stages[-1]
    scale = pace or {}
    head_last = inst.device(last.device).ms[-1] * scale.get(last.device, Pace()).one
    head_first = inst.device(first.device).ms[-1] * scale.get(first.device, Pace()).one
    link = inst.link(last.device, first.device)
    send = link.hop_ms(inst.units[-2].out_bytes)  # the hidden state, to the first stage
    back = link.hop_ms(inst.return_bytes)  # a pick (or, unsplit, the token) after it
    if head_last + head_first <= 0:
        return 0.0, 0.0
    # Both halves done at once: (1 - share) * head_last + back == send + share * head_first.
    share = min((head_last + back - send) / (head_last + head_first), 0.9)
    if share <= 0:
        return 0.0, 0.0
    saving = _saving(share, head_last, head_first, send, back)
    if saving < MIN_SAVING * head_last:
        return 0.0, 0.0
    return round(share, 3), saving
