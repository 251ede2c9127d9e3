"""Bytes on the wire: CBOR maps decoded into typed messages at the edge, or refused.

Control-plane messages (gossip: `wire/control.py`) and data-plane frames (`wire/data.py`)
share one CBOR loader and one set of validators (`wire/checks.py`), which give every field
a type and a range and raise WireError with a one-line reason. Nothing from the network is
unpickled. The wire imports nothing of the protocols' state, only the shared types.
"""

from meshshard.wire.checks import (
    MAX_CONTROL_BYTES,
    MAX_COUNT,
    MAX_FRAME_LIMIT,
    MAX_INCARNATION,
    MAX_ITEMS,
    MAX_TERM,
    MAX_VERSION,
    PROTOCOL,
    WireError,
)
from meshshard.wire.control import (
    Ack,
    ControlMessage,
    Nack,
    Ping,
    PingReq,
    Sync,
    decode,
    encode,
)
from meshshard.wire.data import (
    MAX_DRAFT,
    MAX_FRAME_BYTES,
    MAX_KV_DIM,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOKENS_PER_FRAME,
    TENSOR_DTYPES,
    DataFrame,
    DropFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    PickFrame,
    Sampling,
    StepFrame,
    TensorData,
    TokenFrame,
    decode_frame,
    encode_frame,
)

__all__ = [
    "MAX_CONTROL_BYTES", "MAX_COUNT", "MAX_DRAFT", "MAX_FRAME_BYTES", "MAX_FRAME_LIMIT",
    "MAX_INCARNATION", "MAX_ITEMS", "MAX_KV_DIM", "MAX_SEED", "MAX_TEMPERATURE", "MAX_TERM",
    "MAX_TOKENS_PER_FRAME", "MAX_VERSION", "PROTOCOL", "TENSOR_DTYPES", "Ack", "ControlMessage",
    "DataFrame", "DropFrame", "ErrorCode", "ErrorFrame", "HandoffDone", "HandoffRequest",
    "KVFrame", "Nack", "PickFrame", "Ping", "PingReq", "Sampling", "StepFrame", "Sync",
    "TensorData", "TokenFrame", "WireError", "decode", "decode_frame", "encode", "encode_frame",
]  # fmt: skip
