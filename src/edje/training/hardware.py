"""What the machine is: a one-line description for cards and benchmarks, and whether its CPU
computes bfloat16 natively."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# CPU flags of native bfloat16 matrix products (x86 AVX-512 BF16 / AMX, Arm BF16); without
# them torch's bf16 matmuls run a reference kernel, tens of times slower than float32.
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU lists a native bfloat16 flag (Linux `/proc/cpuinfo`; elsewhere True,
    as there is nothing to read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    return True


def describe_hardware(device: str | torch.device, count: int = 1) -> str:
    """`2 x NVIDIA H100 80GB HBM3` for `count` CUDA devices like `device`, else the CPU with
    the number of cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {cpu_name()}"
