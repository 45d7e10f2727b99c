"""A one-line description of the machine a result was measured on, for cards and benchmarks."""

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


def describe_hardware(device: str | torch.device, count: int = 1) -> str:
    """`2 x NVIDIA H100 80GB HBM3` for `count` CUDA devices like `device`, else the CPU with
    the number of cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {cpu_name()}"
