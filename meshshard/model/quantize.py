"""Weight-only quantization of shards with torchao, PyTorch's own library for it: int8 on
a CPU and CUDA, int4 on CUDA; and the bytes a quantized tensor really holds."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from meshshard.errors import MeshShardError


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized one (a tensor subclass) counts its inner tensors:
    its integer data and scales."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


QUANTIZE = ("none", "int8", "int4")


def check_quantize(quantize: str, device: torch.device, dtype: torch.dtype) -> None:
    """A one-line error where the device cannot run `quantize`, before any weight is read."""
    if quantize == "none":
        return
    if quantize == "int4" and device.type != "cuda":
        raise MeshShardError(
            f"--quantize int4 runs on CUDA only (torchao's int4 weight-only kernels); "
            f"this peer runs on {device.type}: use int8"
        )
    if quantize == "int4" and dtype != torch.bfloat16:
        raise MeshShardError(
            f"--quantize int4 runs in bfloat16 only (torch's int4 kernel); not {dtype}"
        )
    if quantize not in ("int8", "int4"):
        raise MeshShardError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")


def quantize_layers(layers: list[nn.Module], quantize: str, group: int = 0) -> None:
    """Weight-only quantization of the decoder layers' linear weights with torchao (the
    embedding and a head tied to it stay as they are), after check_quantize; int4 in groups
    of `group` inputs (costs.int4_group); a one-line error where the library is missing."""
    if quantize == "none":
        return
    with _quiet_torchao():
        try:
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
        except ImportError:
            raise MeshShardError(
                f"--quantize {quantize} needs torchao (pip install torchao)"
            ) from None
        # int4 in torch's own tinygemm layout: torchao's default int4 layout needs a
        # separate kernel package (mslk) that a plain torch install lacks.
        config: Any = (
            Int8WeightOnlyConfig()
            if quantize == "int8"
            else Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        )
        for layer in layers:
            quantize_(layer, config)


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """On a CPU torchao's CUDA-only kernels fail to load, and torch warns of its enum types
    when they are first used: harmless, and not for a user's terminal."""
    import warnings

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [each.level for each in quiet]
    for each in quiet:
        each.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each, level in zip(quiet, levels, strict=True):
            each.setLevel(level)
