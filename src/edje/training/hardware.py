"""What the machine is: a one-line description for cards and benchmarks, whether its CPU
computes bfloat16 natively, and how fast its bfloat16 matmuls are against float32's."""

from __future__ import annotations

import os
import platform
import statistics
import time
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


def matmul_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a `size`^3 matmul in `dtype` on the CPU threads this process may use: the
    median of `repeats` timed products after one warm-up (oneDNN compiles on first use)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def cpu_bf16_speedup() -> float:
    """bfloat16 matmul GFLOP/s over float32's on this CPU, measured now (about 0.1 s). Native
    bf16 is not always faster: with AMX a bf16 GEMM ran 9.6x float32's speed; on a Xeon whose
    AVX-512 BF16 came without AMX, 0.52x (docs/training.md, Hardware)."""
    return matmul_gflops(torch.bfloat16) / matmul_gflops(torch.float32)


def describe_hardware(device: str | torch.device, count: int = 1) -> str:
    """`2 x NVIDIA H100 80GB HBM3` for `count` CUDA devices like `device`, else the CPU with
    the number of cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {cpu_name()}"
