"""Hardware figures the run summaries are measured against."""

from __future__ import annotations

import time


def matmul_flops(dtype=None, size: int = 2048, seconds: float = 1.0) -> float:
    """Measured dense matmul rate (FLOP/s) of this machine in `dtype` (default bf16) on the training device: the
    denominator of model FLOPs utilisation (MFU). Square `size` matmuls, repeated for about `seconds`."""
    import torch

    dtype = dtype or torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: kernels chosen, caches filled
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        if runs % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * size**3 * runs / elapsed


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
