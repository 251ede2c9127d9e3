"""Where a peer runs its shard: `auto` (CUDA, then Apple MPS, then CPU), `cpu`, `cuda[:N]` or
`mps`; the dtype each runs best in; and the memory it can offer.

The choice is pure (`choose`) over what the machine has (`Hardware`), so its rules and errors
are tested anywhere; `hardware()` asks torch once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from meshshard.errors import MeshShardError

RESERVE = 0.1  # of a device's free memory left for the runtime, activations and others
CPU_SHARE = 0.8  # of available host memory offered on a CPU (or unified memory on MPS)


@dataclass(frozen=True)
class Hardware:
    cuda: int = 0  # CUDA devices
    mps: bool = False
    bf16_cuda: bool = False  # the CUDA device runs bfloat16 natively


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu", "cuda" or "mps"
    index: int | None = None

    @property
    def torch_name(self) -> str:
        return f"{self.kind}:{self.index}" if self.index is not None else self.kind

    def __str__(self) -> str:
        return self.torch_name


def choose(request: str, hw: Hardware) -> Device:
    """The device for `--device` (auto, cpu, cuda, cuda:N, mps), or a one-line error."""
    request = request.strip().lower()
    if request == "auto":
        if hw.cuda:
            return Device("cuda", 0)
        return Device("mps") if hw.mps else Device("cpu")
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", request)
    if match is None:
        raise MeshShardError(f"--device {request}: expected auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        n = int(index or 0)
        if not hw.cuda:
            raise MeshShardError(f"--device {request}: this machine has no CUDA device")
        if n >= hw.cuda:
            raise MeshShardError(
                f"--device {request}: this machine has {hw.cuda} CUDA device"
                f"{'s' if hw.cuda > 1 else ''} (cuda:0..cuda:{hw.cuda - 1})"
            )
        return Device("cuda", n)
    if index is not None:
        raise MeshShardError(f"--device {request}: only CUDA devices are numbered")
    if kind == "mps" and not hw.mps:
        raise MeshShardError(f"--device {request}: this machine has no Apple MPS device")
    return Device(kind)


@dataclass(frozen=True)
class Placement:
    """Where and how a peer runs its shard."""

    device: Device
    dtype: str
    quantize: str = "none"

    def describe(self) -> str:
        """For profiles, status and the dashboard: "cpu float32", "cuda:0 bfloat16 int8"."""
        q = f" {self.quantize}" if self.quantize != "none" else ""
        return f"{self.device} {self.dtype}{q}"


def place(device: str, dtype: str | None, quantize: str, hw: Hardware | None = None) -> Placement:
    """The device for `--device`, the dtype for `--dtype` (None: the device's default) and the
    quantization for `--quantize`, or a one-line error for what the machine cannot do."""
    hw = hw or hardware()
    chosen = choose(device, hw)
    if quantize not in ("none", "int8", "int4"):
        raise MeshShardError(f"--quantize {quantize}: expected none, int8 or int4")
    if quantize == "int4" and chosen.kind != "cuda":
        raise MeshShardError(
            f"--quantize int4 runs on CUDA only (torchao's int4 kernels); this peer runs on "
            f"{chosen}: use int8"
        )
    if dtype == "bfloat16" and chosen.kind == "cuda" and not hw.bf16_cuda:
        raise MeshShardError(f"--dtype bfloat16: {chosen} does not run bfloat16; use float16")
    dtype = dtype or default_dtype(chosen, hw)
    if quantize == "int4" and dtype != "bfloat16":
        # torch's int4 kernel (tinygemm) takes bfloat16 activations on a bfloat16 GPU only.
        raise MeshShardError(
            f"--quantize int4 runs in bfloat16 only, which {chosen} does not run natively"
            if not hw.bf16_cuda
            else f"--quantize int4 runs in bfloat16 only: drop --dtype {dtype}"
        )
    return Placement(chosen, dtype, quantize)


def default_dtype(device: Device, hw: Hardware) -> str:
    """bfloat16 on CUDA where it runs natively, float16 on MPS, float32 on a CPU: there it
    keeps sharded answers exactly those of one process, which a speculating bfloat16 chain
    did not on a CPU where bfloat16 ran 1.6-1.9x faster (docs/devices.md)."""
    if device.kind == "cuda":
        return "bfloat16" if hw.bf16_cuda else "float16"
    return "float16" if device.kind == "mps" else "float32"


def hardware() -> Hardware:
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return Hardware(cuda, mps, bf16)


def offered_memory(device: Device) -> float:
    """Bytes a peer offers by default: free device memory less a reserve on CUDA; a share of
    available host memory on a CPU or on MPS (whose memory is the host's)."""
    if device.kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device.index or 0)
        return free * (1 - RESERVE)
    return host_available() * CPU_SHARE


def host_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1.25e9  # unknown: offer 1 GB
