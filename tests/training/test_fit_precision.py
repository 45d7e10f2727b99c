"""`edje fit` keeps bf16 where the CPU computes it natively and falls back to float32 where a
bf16 matmul would run a reference kernel tens of times slower."""

from __future__ import annotations

import pytest

from edje.commands import fit
from edje.training import hardware

AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert hardware.cpu_has_native_bf16(AVX512_BF16)
    assert hardware.cpu_has_native_bf16(ARM_BF16)
    assert not hardware.cpu_has_native_bf16(AVX2_ONLY)


@pytest.mark.parametrize(
    ("cpuinfo", "accelerator", "expected"),
    [
        (AVX2_ONLY, "cpu", "32-true"),
        (AVX512_BF16, "cpu", "bf16-mixed"),
        (AVX2_ONLY, "gpu", "bf16-mixed"),  # not the CPU's business
    ],
)
def test_cpu_without_bf16_trains_in_float32(monkeypatch, cpuinfo, accelerator, expected):
    native = hardware.cpu_has_native_bf16(cpuinfo)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    trainer = {"precision": "bf16-mixed", "accelerator": accelerator}
    fit.cpu_precision(trainer)
    assert trainer["precision"] == expected
