"""AQT's symmetric abs-max integer grid as plain numpy, for the calibrated PTQ methods (GPTQ, AWQ, SmoothQuant).

They only change which integers a weight gets, never the grid, so their codes and scales must follow AQT's rules
bit for bit (tests/test_ptq_gptq.py checks this against AQT's own CONVERT output).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def max_code(bits: int) -> int:
    """The largest integer a `bits`-bit symmetric code takes (127 for int8, 7 for int4); codes lie in [-max, max]."""
    return 2 ** (bits - 1) - 1


def abs_max_scale(w: np.ndarray, bits: int, scale_dtype: str = "float32", axis=0) -> np.ndarray:
    """AQT's abs-max scale: max|w| over `axis` (kept, size 1) / (2^(bits-1) - 0.5), cast to `scale_dtype`.

    The abs-max sits on the far edge of the last bucket (AQT's IntSymmetric with preserve_zero, not
    preserve_max_val); an all-zero slice gets scale 1 / (2^(bits-1) - 0.5) as in AQT. w: float32 values.
    Returns float32 [..., 1, ...] holding values representable in `scale_dtype` ("float32" | "bfloat16").
    """
    abs_max = np.max(np.abs(np.asarray(w, np.float32)), axis=axis, keepdims=True)
    abs_max = np.where(abs_max == 0, np.float32(1), abs_max)
    scale = abs_max * np.float32(1 / (2 ** (bits - 1) - 0.5))  # XLA turns AQT's division into this product
    return scale.astype(jnp.dtype(scale_dtype)).astype(np.float32)


def round_to_grid(w: np.ndarray, scale: np.ndarray, bits: int, scale_dtype: str = "float32") -> np.ndarray:
    """Integer codes of w on the grid `scale` (broadcast against w), as AQT computes them: w * (1 / scale) with the
    reciprocal taken in `scale_dtype`, clipped to +-max_code(bits), ties rounded to even. Returns int8 codes."""
    inverse = (np.float32(1) / np.asarray(scale, np.float32)).astype(jnp.dtype(scale_dtype)).astype(np.float32)
    top = max_code(bits)
    return np.rint(np.clip(np.asarray(w, np.float32) * inverse, -top, top)).astype(np.int8)


def rtn(kernel: np.ndarray, bits: int, group_size: int | None = None,
        scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest of kernel [in, out]: (codes int8 [in, out], scales float32 [groups, out]) with one scale per
    output column (groups = 1) or per column and group of `group_size` consecutive inputs."""
    fan_in, out = kernel.shape
    size = group_size or fan_in
    grouped = np.asarray(kernel, np.float32).reshape(fan_in // size, size, out)
    scales = abs_max_scale(grouped, bits, scale_dtype, axis=1)  # [groups, 1, out]
    return round_to_grid(grouped, scales, bits, scale_dtype).reshape(fan_in, out), scales[:, 0]


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 kernel [in, out] that codes [in, out] with scales [groups, out] stand for."""
    fan_in, out = codes.shape
    groups = scales.shape[0]
    grouped = codes.reshape(groups, fan_in // groups, out).astype(np.float32) * scales[:, None].astype(np.float32)
    return grouped.reshape(fan_in, out)
