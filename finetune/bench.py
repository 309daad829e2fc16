"""Hardware figures the run summaries are measured against."""

from __future__ import annotations

import time


def matmul_flops(dtype=None, size: int = 2048, seconds: float = 2.0, windows: int = 8) -> float:
    """Measured dense matmul rate (FLOP/s) of this machine in `dtype` (default bf16) on the training device: the
    denominator of model FLOPs utilisation (MFU). Square `size` matmuls into a preallocated output, timed over
    `windows` slices of `seconds` in all; the best slice is the rate (on shared cores the others measure the
    neighbours too)."""
    import torch

    dtype = dtype or torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: kernels chosen, caches filled
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(windows):
        _sync(device)
        runs, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b, out=out)
            runs += 1
            if runs % 4 == 0:
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / windows:
                    break
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
