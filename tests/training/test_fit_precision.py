"""`edje fit` keeps bf16 where the CPU computes it faster than float32 and falls back to
float32 where it does not: no native bf16 (a reference kernel tens of times slower), or native
bf16 that still measures slower (AVX-512 BF16 without AMX)."""

from __future__ import annotations

import os

import pytest
import torch

from edje.commands import fit
from edje.training import hardware

AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert hardware.cpu_has_native_bf16(AVX512_BF16)
    assert hardware.cpu_has_native_bf16(ARM_BF16)
    assert not hardware.cpu_has_native_bf16(AVX2_ONLY)


def test_matmul_speed_is_measured_in_each_dtype(monkeypatch):
    products = []
    real_matmul = torch.Tensor.__matmul__

    def counting_matmul(a, b):
        products.append(a.dtype)
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
    assert hardware.matmul_gflops(torch.float32, size=64, repeats=3) > 0
    assert hardware.matmul_gflops(torch.bfloat16, size=64, repeats=3) > 0
    assert products == [torch.float32] * 4 + [torch.bfloat16] * 4  # a warm-up and 3 timed


@pytest.mark.parametrize(
    ("cpuinfo", "speedup", "accelerator", "expected"),
    [
        (AVX2_ONLY, 9.6, "cpu", "32-true"),  # no native bf16: not even measured
        (AVX512_BF16, 9.6, "cpu", "bf16-mixed"),  # AMX
        (AVX512_BF16, 0.5, "cpu", "32-true"),  # AVX-512 BF16 without AMX
        (AVX2_ONLY, 0.5, "gpu", "bf16-mixed"),  # not the CPU's business
    ],
)
def test_cpu_trains_in_float32_where_bf16_is_not_faster(
    monkeypatch, caplog, cpuinfo, speedup, accelerator, expected
):
    native = hardware.cpu_has_native_bf16(cpuinfo)
    measured = []
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: measured.append(1) or speedup)
    monkeypatch.setenv(fit.BF16_SPEEDUP_ENV, "")  # unmeasured; restored after the test
    trainer = {"precision": "bf16-mixed", "accelerator": accelerator}
    fit.cpu_precision(trainer)
    assert trainer["precision"] == expected
    assert len(measured) == (native and accelerator == "cpu")  # timed only where it decides
    if expected == "32-true":
        assert "training in float32" in caplog.text
        assert ("0.50x" in caplog.text) == native


def test_the_runs_other_processes_reuse_the_first_measurement(monkeypatch):
    """DDP's processes start from the first one's environment: they take its measurement, so
    no rank trains in another precision because its own timing came out on the other side."""
    speeds = iter([0.5, 9.6])
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: next(speeds))
    monkeypatch.setenv(fit.BF16_SPEEDUP_ENV, "")  # unmeasured; restored after the test
    first, other = ({"precision": "bf16-mixed", "accelerator": "cpu"} for _ in range(2))
    fit.cpu_precision(first)
    fit.cpu_precision(other)
    assert first["precision"] == other["precision"] == "32-true"
    assert float(os.environ[fit.BF16_SPEEDUP_ENV]) == 0.5
