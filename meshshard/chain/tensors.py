"""Torch tensors to and from wire TensorData, by raw bytes (no pickle, no torch.load)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from meshshard.wire import TENSOR_DTYPES, TensorData, WireError

_TORCH = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in _TORCH.items()}
_NUMPY = {torch.float32, torch.float16, torch.int64}


def _suspect(exponent: int) -> bytes:
    """A translation table: 1 for a top byte holding all of `exponent`'s bits, else 0."""
    return bytes(int(b & exponent == exponent) for b in range(256))


# Every NaN and infinity has all its exponent bits set, and an element's top byte (the last,
# little-endian) holds all of bfloat16's and float32's but one, and all of float16's: a
# tensor none of whose top bytes holds them is finite, found by two calls on bytes. Torch's
# own check costs 0.15-0.2 ms after a pass has flushed the caches (three kernels' code), on
# the critical path of every hop of hidden states (docs/data-plane.md, *Where the mesh's
# hops go*); it runs only where the screen cannot tell (|x| >= 2**127; float16's is exact).
_SCREENS = {"float32": _suspect(0x7F), "bfloat16": _suspect(0x7F), "float16": _suspect(0x7C)}


def to_wire(t: torch.Tensor) -> TensorData:
    """The tensor's bytes; one copy off the device where it is not on the host already."""
    if t.requires_grad or not t.is_cpu or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    if t.dtype not in _NAMES:
        raise ValueError(f"cannot send a {t.dtype} tensor")
    # numpy holds float32, float16 and int64 as they are; bfloat16 it knows not, so as bytes.
    data = (t if t.dtype in _NUMPY else t.view(torch.uint8)).numpy().tobytes() if t.numel() else b""
    return TensorData(_NAMES[t.dtype], tuple(t.shape), data)


def from_wire(data: TensorData) -> torch.Tensor:
    """The tensor; hidden states must be finite (a NaN would poison every later token)."""
    t = torch.frombuffer(bytearray(data.data), dtype=_TORCH[data.dtype]).reshape(data.shape)
    if not finite(data, t):
        raise WireError("tensor holds NaN or infinity")
    return t


def finite(data: TensorData, t: torch.Tensor | None = None) -> bool:
    """Whether a wire tensor holds no NaN or infinity (one of integers always does); `t`:
    the tensor, where it is already made."""
    if not _maybe_not_finite(data):
        return True
    if t is None:
        t = torch.frombuffer(bytearray(data.data), dtype=_TORCH[data.dtype])
    return bool(torch.isfinite(t).all())


def ids_to_wire(ids: Sequence[int]) -> TensorData:
    """Token ids as `to_wire` gives them, without torch: a step's next token is made on the
    critical path, where a tensor and its copy cost 0.05-0.1 ms after a pass."""
    return TensorData("int64", (len(ids),), array("q", ids).tobytes())


def ids_from_wire(data: TensorData) -> list[int]:
    """The ids of a wire tensor of token ids (int64, its shape checked where it was read)."""
    return array("q", data.data).tolist()


def _maybe_not_finite(data: TensorData) -> bool:
    suspect = _SCREENS.get(data.dtype)
    if suspect is None:  # integers
        return False
    size = TENSOR_DTYPES[data.dtype]
    return b"\x01" in data.data[size - 1 :: size].translate(suspect)


def rows(data: TensorData, start: int, stop: int) -> TensorData:
    """Rows (tokens) start..stop of a frame's tensor, by its bytes."""
    row = len(data.data) // data.shape[0] if data.shape[0] else 0
    return TensorData(
        data.dtype, (stop - start, *data.shape[1:]), data.data[start * row : stop * row]
    )


def joined(first: TensorData, then: TensorData) -> TensorData:
    """Two frames' tensors as one: `then`'s rows after `first`'s."""
    if first.dtype != then.dtype or first.shape[1:] != then.shape[1:]:
        raise ValueError("only tensors of one dtype and row shape join")
    shape = (first.shape[0] + then.shape[0], *first.shape[1:])
    return TensorData(first.dtype, shape, first.data + then.data)


def positions(data: TensorData, start: int, stop: int) -> TensorData:
    """Positions start..stop of a cache layer's tensor [1, heads, length, head_dim], by its
    bytes (each head's positions lie together)."""
    _, heads, length, dim = data.shape
    row = len(data.data) // (heads * length) if heads * length else 0  # one head's position
    parts = [
        data.data[(h * length + start) * row : (h * length + stop) * row] for h in range(heads)
    ]
    return TensorData(data.dtype, (1, heads, stop - start, dim), b"".join(parts))
