"""Served per-group weight-only layers with `int` numerics on XLA CPU: the exact per-group integer codes in one int8
dot batched over the groups, the activations split in hi/lo int8 halves per (row, group). XLA CPU's int8 dot is its
fastest matmul; dequantizing the codes to float (hoisted out of the decode loop by XLA) leaves decode at float's speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.plan import LayerPlan
from quant.serving_int import LO_UNITS, split_hi_lo, weight_only_on_cpu

# Rows (tokens) up to which a served per-group layer runs `served_group_matmul`; more rows serve the dequantized float
# matmul (which XLA hoists out of the decode loop: a float32 copy of the weights while generating). Its elementwise
# work grows as groups * rows * n, so it wins only for the fewest rows. Decode ms per token at d_model 512, 8 layers,
# w4 g32, bf16 compute, 2-core CPU (load 3-4, two rounds each; docs/results/cpu-2core/serving-ab.md, session 6), this
# path against the dequantized one: batch 1 6.0-6.4 vs 8.4-9.0, batch 2 11.7-12.5 vs 13.1-14.4, batch 3 18.0-18.1 vs
# 16.7-17.5, batch 4 16.0-16.6 vs 13.4-13.5, batch 8 48-55 vs 30-35.
GROUP_DOT_MAX_ROWS = 2


def uses_group_path(plan: LayerPlan, stored: dict, x: jax.Array) -> bool:
    """Whether a served `int` layer runs `served_group_matmul` for x [..., in]: on CPU, a weight-only AQT layer
    stored per group (value [groups, group_size, n]) and at most GROUP_DOT_MAX_ROWS rows of x."""
    return weight_only_on_cpu(plan) and stored["value"].ndim == 3 and x.size // x.shape[-1] <= GROUP_DOT_MAX_ROWS


def sum_groups(p: jax.Array) -> jax.Array:
    """p [groups, ...] float32 -> [...], the sum over the first axis as a dot with a vector of ones: XLA CPU hands a
    dot to YNNPACK's matmul, where a reduce would go to its reduction (65-125 us per layer at decode, more than the
    layer's int8 dot). Per layer at decode (1 row, w4 g32, 2-core CPU, 16 layers in one jit): 84 / 82 / 37 us at
    [512 -> 1376] / [1376 -> 512] / [512 -> 512], against 89 / 114 / 42 us for a pairwise tree of adds and 206 /
    215 / 85 us for jnp.sum; float32 [1, in] @ [in, out]: 116 / 123 / 47 us."""
    return jnp.tensordot(jnp.ones(p.shape[:1], p.dtype), p, axes=1)


def served_group_matmul(stored: dict, x: jax.Array) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x's dtype for a weight-only per-group layer, W = value * scale with value
    [groups, group_size, n] (int8 or int4 codes, used exactly) and scale [groups, 1, 1, n] (AQT's per-group layout).

    Each (row, group) slice of x is split into hi/lo int8 halves with its own scale (`split_hi_lo`: abs-max / 127);
    one int8 dot batched over groups, [groups, 2 * rows, group_size] x [groups, group_size, n], gives exact int32
    partial sums per group (exact in float32 too while group_size * 127 * max |code| < 2^24);
    y[r, n] = sum_j (hi + lo / LO_UNITS)[j, r, n] * xscale[r, j] * scale[j, n] in float32.
    The only error against the float64 matmul over W is the split's: per element of x at most
    xscale / (2 * LO_UNITS), i.e. the abs-max of its (row, group) slice / 64,516, through |W| (plus float32 sums)."""
    shape, value = x.shape, stored["value"]
    groups, size, n = value.shape
    rows = x.reshape(-1, groups, size)
    count = rows.shape[0]
    q, xscale = split_hi_lo(rows)  # [2 * rows, groups, size] int8, [rows, groups, 1] float32
    dims = (((2,), (1,)), ((1,), (0,)))  # contract group_size, batch over groups
    acc = jax.lax.dot_general(q, value.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)  # [groups, 2 * rows, n]
    partial = (acc[:, :count] + acc[:, count:] / LO_UNITS) * jnp.moveaxis(xscale, 1, 0)
    y = sum_groups(partial * stored["scale"].reshape(groups, 1, n).astype(jnp.float32))  # [rows, n]
    return y.astype(x.dtype).reshape(shape[:-1] + (n,))
