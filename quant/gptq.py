"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
round one input row of a kernel at a time and spread its error over the rows not yet rounded, weighted by the
inverse Hessian of the layer's inputs, so that ||X W - X Q(W)|| (not ||W - Q(W)||) is kept small.

The grid is AQT's abs-max grid (quant/grid.py), so a GPTQ kernel is served by the same code as an RTN one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg

from quant.grid import abs_max_scale, round_to_grid
from slm_jax.errors import UserError


MAX_DAMP = 1e6  # far beyond 1 the damped Hessian is all diagonal (GPTQ is RTN); huge values overflow float64


@dataclasses.dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean diagonal ("percdamp")
    block_size: int = 128  # rows rounded per lazy batch of updates (changes speed, not the result)
    act_order: bool = False  # round inputs in order of decreasing Hessian diagonal (largest activations first)

    def __post_init__(self):
        if not 0 <= self.damp <= MAX_DAMP:
            raise UserError(f"GPTQ damping must be in [0, {MAX_DAMP:g}] (a fraction of the mean Hessian diagonal; "
                            f"far above 1 GPTQ is round-to-nearest), got {self.damp}")
        if self.block_size <= 0:
            raise UserError(f"GPTQ block size must be positive, got {self.block_size}")


def inverse_hessian_factor(hessian: np.ndarray, damp: float, name: str = "layer") -> np.ndarray:
    """U, upper triangular [in, in], with (H + damp * mean(diag H) * I)^-1 = U^T U (float64).

    Row i of U, divided by U[i, i], is how the error of rounding input i moves the inputs after it, given that all
    inputs before it are already fixed (the paper's Cholesky reformulation of OBS, Section 3, Step 3).
    Raises UserError when the Hessian is not finite, or when the damped Hessian is not positive definite: one line
    naming the layer, the cause and the remedy (`singular_hessian_message`).
    """
    if not np.all(np.isfinite(hessian)):
        raise UserError(f"GPTQ: the input Hessian of {name} is not finite (its calibration inputs overflow)")
    h = np.array(hessian, np.float64)
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    try:
        inverse = scipy.linalg.cho_solve((np.linalg.cholesky(h), True), np.eye(len(h)))
        factor = np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError:
        raise UserError(singular_hessian_message(hessian, damp, name)) from None
    if not np.all(np.isfinite(factor)):
        raise UserError(f"GPTQ: the input Hessian of {name} is not finite")
    return factor


def singular_hessian_message(hessian: np.ndarray, damp: float, name: str) -> str:
    """The one line for a Hessian [in, in] that Cholesky refused: which layer, why, and what to change. Undamped,
    the cause is calibration inputs that span fewer directions than the layer has inputs (too few distinct tokens,
    e.g. layer 0's attention sees one vector per token id, or inputs that depend on each other), which damping
    resolves and more varied calibration text may; damped, only a damping too small for the float32 rounding noise
    of the Hessian's sums fails."""
    if damp == 0:
        return (f"GPTQ with --damp 0 cannot invert the Hessian of {name}: its calibration inputs span fewer than its "
                f"{len(hessian):,} input directions (too few distinct tokens, or inputs that depend on each other); "
                f"use a positive --damp (default {GPTQSettings.damp}) or more --calib-batches")
    return (f"GPTQ cannot invert the Hessian of {name} even with --damp {damp:g}: its calibration inputs span fewer "
            f"than its {len(hessian):,} input directions and this damping is too small to make up for it; use a "
            f"larger --damp (default {GPTQSettings.damp})")


def gptq(kernel: np.ndarray, hessian: np.ndarray, bits: int, group_size: int | None = None,
         scale_dtype: str = "float32", settings: GPTQSettings = GPTQSettings(),
         name: str = "layer") -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-round kernel [in, out] (float) for inputs with Hessian H = 2 X^T X [in, in] (X: [tokens, in]).

    Returns (codes int8 [in, out] in [-(2^(bits-1)-1), 2^(bits-1)-1], scales float32 [groups, out]); the kernel
    they stand for is codes * scales per group (`quant.grid.dequantize`). Scales follow AQT's abs-max grid in
    `scale_dtype`: per channel (group_size None) from the original kernel, as AQT's RTN computes them; per group,
    from the group's weights as updated by every row rounded before the group's first row is (with act_order the
    group is still a run of `group_size` consecutive inputs, as AQT's layout needs, and is fixed when its first
    member comes up in activation order).

    Follows the paper's Algorithm 1 (lazy batches of `settings.block_size` rows, Cholesky of the inverse
    Hessian), computing group scales from the exact current weights even inside a batch, so the result does not
    depend on the block size. An input that calibration never saw (H[i, i] == 0) is rounded to nearest and
    neither gives nor takes error (the reference zeroes its weights instead; unseen is not the same as unused).
    Raises UserError when the damped Hessian is singular (see `inverse_hessian_factor`).
    """
    fan_in, out = kernel.shape
    if hessian.shape != (fan_in, fan_in):
        raise ValueError(f"Hessian {hessian.shape} does not match kernel {kernel.shape}")
    size = group_size or fan_in
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1  # a positive semi-definite H is zero in a zero diagonal entry's row and column
    order = np.argsort(-np.diag(h), kind="stable") if settings.act_order else np.arange(fan_in)
    position = np.argsort(order)  # position[input] = when it is rounded
    u = inverse_hessian_factor(h[np.ix_(order, order)], settings.damp, name)
    w = np.asarray(kernel, np.float64)[order]  # rows in rounding order, updated as rows before them are rounded
    codes = np.zeros((fan_in, out), np.int8)
    scales = np.zeros((fan_in // size, out), np.float32)
    scaled = np.zeros(fan_in // size, bool)
    if group_size is None:
        scales[0] = abs_max_scale(kernel, bits, scale_dtype)[0]
        scaled[0] = True

    for start in range(0, fan_in, settings.block_size):
        stop = min(start + settings.block_size, fan_in)
        block = w[start:stop].copy()
        errors = np.zeros_like(block)  # (w - q) / U[i, i] of each rounded row
        for i in range(stop - start):
            row = order[start + i]
            group = row // size
            if not scaled[group]:
                scales[group] = abs_max_scale(_current_rows(w, block, errors[:i], u, start, i,
                                                            position[group * size:(group + 1) * size]),
                                              bits, scale_dtype)[0]
                scaled[group] = True
            q = round_to_grid(block[i], scales[group], bits, scale_dtype)
            codes[row] = q
            errors[i] = (block[i] - q.astype(np.float64) * scales[group]) / u[start + i, start + i]
            block[i:] -= np.outer(u[start + i, start + i:stop], errors[i])
        w[stop:] -= u[start:stop, stop:].T @ errors
    return codes, scales


def _current_rows(w, block, errors, u, start: int, done: int, positions: np.ndarray) -> np.ndarray:
    """The current values of the rows at `positions` (all at or after start + done): those in the block are
    up to date; those after it still owe the lazy update from the block's `done` rounded rows."""
    rows = np.empty((len(positions), w.shape[1]))
    stop = start + len(block)
    inside = positions < stop
    rows[inside] = block[positions[inside] - start]
    later = positions[~inside]
    rows[~inside] = w[later] - u[start:start + done, later].T @ errors
    return rows
