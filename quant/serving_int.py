"""Served integer matmuls beyond AQT's own forms, for XLA CPU: weight-only layers as one int8 dot over the
activations split in two int8 halves (hi/lo). On that backend the int8 dot is the fastest matmul, and converting
the stored codes to float every step kept weight-only serving at float's speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quant.plan import LayerPlan

# lo counts units of 1/LO_UNITS of hi's: |lo| <= LO_UNITS / 2 fits int8 and the split's error is a 1/(2 * 127 * 254)
# = 1.55e-5 part of the row's abs-max, below bfloat16's rounding of any value above 1/250 of it
LO_UNITS = 254


def split_hi_lo(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [rows, ..., k] (any float dtype) -> (q [2 * rows, ..., k] int8, scale [rows, ..., 1] float32) with
    x ~= scale * (q[:rows] + q[rows:] / LO_UNITS): hi = round(x / scale), lo = round((x / scale - hi) * LO_UNITS),
    scale = abs-max of the slice along k / 127 (1 for an all-zero slice). |x - that| <= scale / (2 * LO_UNITS) per
    element.
    Stacking hi over lo makes one int8 dot of twice the rows, which for one row also dodges XLA CPU's slow int8
    matrix-vector product (see quant.provider.two_rows)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, jnp.ones_like(amax), amax) / 127.0
    units = x / scale
    hi = jnp.round(units)
    lo = jnp.round((units - hi) * LO_UNITS)
    return jnp.concatenate([hi, lo]).astype(jnp.int8), scale


def weight_only_on_cpu(plan: LayerPlan) -> bool:
    """Whether a served `int` layer may take one of the CPU int8 paths over hi/lo activations (this module's and
    quant.serving_group's): on CPU, a weight-only AQT layer."""
    return jax.default_backend() == "cpu" and plan.scheme == "aqt" and plan.act_bits is None


def uses_int_path(plan: LayerPlan, stored: dict) -> bool:
    """Whether a served `int` layer runs `served_int_matmul`: on CPU, a weight-only AQT layer whose stored weight is
    per channel (value [k, n]; per-group layers re-quantized by `per_channel_int8` count). Other backends, and
    layers with act_bits, serve AQT's forms."""
    return weight_only_on_cpu(plan) and stored["value"].ndim == 2


def dequantizes(stored: dict) -> bool:
    """Whether a served layer is faster as one float matmul over its weight dequantized in the step
    (quant.provider.serve_fake) than in AQT's integer form, whatever its numerics: on CPU, a per-group layout (value
    [groups, group_size, n]), which AQT runs as a batched int8 dot over groups (7x slower than one dot at 1 row)."""
    return jax.default_backend() == "cpu" and stored["value"].ndim == 3


def served_int_matmul(stored: dict, x: jax.Array) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x's dtype for a weight-only layer, W = value [k, n] (int8 or int4 codes) times
    scale (one per column, any shape of n elements): x split into hi/lo int8 halves per row (`split_hi_lo`), one
    int8 dot with exact int32 sums over twice the rows, rescaled in float32. The only error against the float
    matmul over W is the split's, at most a 1.55e-5 part of each row's abs-max per element (through |W|)."""
    shape, value = x.shape, stored["value"]
    n = value.shape[-1]
    rows = x.reshape(-1, shape[-1])
    q, row_scale = split_hi_lo(rows)
    dims = (((1,), (0,)), ((), ()))
    acc = jax.lax.dot_general(q, value.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)
    count = rows.shape[0]
    y = (acc[:count] + acc[count:] / LO_UNITS) * row_scale * stored["scale"].reshape(1, n).astype(jnp.float32)
    return y.astype(x.dtype).reshape(shape[:-1] + (n,))


def requantize_per_channel(value, scale) -> tuple[np.ndarray, np.ndarray]:
    """A per-group weight (value [groups, group_size, n] int codes, scale [groups, 1, 1, n]) as per-channel int8:
    W = value * scale exactly (float64), then codes round(W / s) with s = abs-max of W's column / 127 (1/127 for an
    all-zero column). Returns (codes [groups * group_size, n] int8, s [1, 1, n] float32: AQT's per-channel serving
    layout for the model's [batch, seq, in] activations); |codes * s - W| <= s / 2 per
    weight (plus s's float32 rounding), a 1/254 part of the column's abs-max: 18x finer than an INT4 code's step
    (1/14 of its group's abs-max), so the served weight is the per-group weight within that bound, not bit for bit."""
    value, scale = np.asarray(value, np.int8).astype(np.float64), np.asarray(scale, np.float32).astype(np.float64)
    n = value.shape[-1]
    weight = (value * scale.reshape(-1, 1, n)).reshape(-1, n)
    amax = np.abs(weight).max(axis=0, keepdims=True)
    step = (np.where(amax == 0, 1.0, amax) / 127).astype(np.float32)
    codes = np.clip(np.round(weight / step.astype(np.float64)), -127, 127).astype(np.int8)
    return codes, step.reshape(1, 1, n)
