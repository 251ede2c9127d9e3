"""Where a peer runs: the device choice, its dtype, and its errors, for machines this one is
not (pure, over a description of the hardware)."""

from __future__ import annotations

import pytest

from meshshard.errors import MeshShardError
from meshshard.model.device import Device, Hardware, Placement, choose, default_dtype, place

CPU_ONLY = Hardware()
ONE_GPU = Hardware(cuda=1, bf16_cuda=True)
OLD_GPU = Hardware(cuda=2, bf16_cuda=False)
MAC = Hardware(mps=True)


@pytest.mark.parametrize(
    "request_, hw, want",
    [
        ("auto", CPU_ONLY, Device("cpu")),
        ("auto", ONE_GPU, Device("cuda", 0)),  # CUDA first
        ("auto", MAC, Device("mps")),  # then MPS
        ("auto", Hardware(cuda=1, mps=True), Device("cuda", 0)),
        ("cpu", ONE_GPU, Device("cpu")),
        ("cuda", ONE_GPU, Device("cuda", 0)),
        ("CUDA:1", OLD_GPU, Device("cuda", 1)),
        ("mps", MAC, Device("mps")),
    ],
)
def test_the_device_asked_for(request_: str, hw: Hardware, want: Device) -> None:
    assert choose(request_, hw) == want


@pytest.mark.parametrize(
    "request_, hw, error",
    [
        ("cuda", CPU_ONLY, "this machine has no CUDA device"),
        ("cuda:7", ONE_GPU, r"this machine has 1 CUDA device \(cuda:0\.\.cuda:0\)"),
        ("cuda:2", OLD_GPU, "has 2 CUDA devices"),
        ("mps", CPU_ONLY, "no Apple MPS device"),
        ("mps:1", MAC, "only CUDA devices are numbered"),
        ("tpu", ONE_GPU, "expected auto, cpu, cuda, cuda:N or mps"),
        ("cuda:x", ONE_GPU, "expected auto"),
    ],
)
def test_a_device_the_machine_lacks_is_a_one_line_error(
    request_: str, hw: Hardware, error: str
) -> None:
    with pytest.raises(MeshShardError, match=error) as e:
        choose(request_, hw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "device, hw, dtype",
    [
        (Device("cpu"), CPU_ONLY, "float32"),
        (Device("cuda", 0), ONE_GPU, "bfloat16"),
        (Device("cuda", 0), OLD_GPU, "float16"),  # no native bfloat16
        (Device("mps"), MAC, "float16"),
    ],
)
def test_each_device_runs_its_best_dtype(device: Device, hw: Hardware, dtype: str) -> None:
    assert default_dtype(device, hw) == dtype


def test_a_placement_takes_what_is_asked_and_refuses_what_cannot_run() -> None:
    assert place("auto", None, "none", ONE_GPU) == Placement(Device("cuda", 0), "bfloat16")
    assert place("cpu", "bfloat16", "int8", ONE_GPU).describe() == "cpu bfloat16 int8"
    assert place("cuda", None, "int4", ONE_GPU).quantize == "int4"
    with pytest.raises(MeshShardError, match="int4 runs on CUDA only"):
        place("cpu", None, "int4", ONE_GPU)
    with pytest.raises(MeshShardError, match="int4 runs in bfloat16 only: drop --dtype float16"):
        place("cuda", "float16", "int4", ONE_GPU)
    with pytest.raises(MeshShardError, match="int4 runs in bfloat16 only, which cuda:0 does not"):
        place("cuda", None, "int4", OLD_GPU)
    with pytest.raises(MeshShardError, match="does not run bfloat16"):
        place("cuda:1", "bfloat16", "none", OLD_GPU)
    with pytest.raises(MeshShardError, match="expected none, int8 or int4"):
        place("cpu", None, "int2", CPU_ONLY)
