"""fp8 (e4m3) linear layers for FastScorer: `torch._scaled_mm` with per-tensor scales.

Optional and off by default. Weights are quantised once (per-tensor scale = amax / 448);
activations are quantised per call with their own dynamic per-tensor scale; the product
accumulates in fp32 inside the kernel and is written in `out_dtype` (bf16 by default).
Hardware fp8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); `fp8_supported`
says whether a device has them. The CPU build of torch also implements `_scaled_mm`, slowly,
which is what lets the tests check the arithmetic here without a GPU.

Example:

```python
>>> import torch
>>> linear = torch.nn.Linear(32, 48)
>>> fp8 = Fp8Linear(linear.weight, linear.bias, out_dtype=torch.float32)
>>> x = torch.randn(5, 32)
>>> error = (fp8(x) - linear(x)).abs().max() / linear(x).abs().max()
>>> bool(error < 0.1)
True

```
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` runs fp8 GEMMs in hardware, and why not when it does not."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"fp8 matmuls need a CUDA device, got {device.type!r}"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch build has no torch._scaled_mm"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return False, f"fp8 needs compute capability >= 8.9, {device} has {capability}"
    return True, ""


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantisation: returns (x / scale as e4m3, fp32 scalar scale)."""
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(torch.nn.Module):
    """`y = x @ W.T + b` with W and x in e4m3 (per-tensor scales), output in `out_dtype`.

    `in_features` and `out_features` must be multiples of 16 (a cuBLASLt rule); rows of `x`
    are padded to a multiple of 16 internally and the padding dropped from the result.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Fp8Linear: in and out features must be multiples of 16, got weight "
                f"{list(weight.shape)}"
            )
        w8, w_scale = _quantize(weight)
        # (out, in) row-major, so .t() is the column-major (in, out) operand _scaled_mm wants.
        self.register_buffer("weight_t", w8.t(), persistent=False)
        self.register_buffer("weight_scale", w_scale, persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(out_dtype), persistent=False
        )
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, in)
        rows = x2.shape[0]
        pad = -rows % 16
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        x8, x_scale = _quantize(x2)
        y = torch._scaled_mm(
            x8,
            self.weight_t,
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )  # (M + pad, out)
        return y[:rows].reshape(*shape[:-1], -1)


__all__ = ["Fp8Linear", "fp8_supported"]
