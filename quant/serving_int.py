"""Served integer matmuls beyond AQT's own forms, for XLA CPU: weight-only layers as int8 dots over activations
split in two int8 halves (hi/lo), and per-group layers as one int8 dot per group. On that backend the int8 dot is
the fastest matmul, and converting the stored codes to float every step kept weight-only and per-group serving at
float's speed (AQT's per-group integer form, a batched dot over groups, is slower still).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from quant.plan import LayerPlan

# lo counts units of 1/LO_UNITS of hi's: |lo| <= LO_UNITS / 2 fits int8 and the split's error is a 1/(2 * 127 * 254)
# = 1.55e-5 part of the row's abs-max, below bfloat16's rounding of any value above 1/250 of it
LO_UNITS = 254
# per-group layers run one int8 dot per group up to this many rows; beyond it the dots' small contraction (32) makes
# them slower than dequantizing the weight once (512 x 1376 int4 g32, 2-core CPU: 8 rows 360 us vs 628 us,
# 64 rows 4.7 ms vs 1.3 ms)
GROUPED_MAX_ROWS = 16


def split_hi_lo(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [rows, k] (any float dtype) -> (q [2 * rows, k] int8, scale [rows, 1] float32) with
    x ~= scale * (q[:rows] + q[rows:] / LO_UNITS): hi = round(x / scale), lo = round((x / scale - hi) * LO_UNITS),
    scale = abs-max of the row / 127 (1 for an all-zero row). |x - that| <= scale / (2 * LO_UNITS) per element.
    Stacking hi over lo makes one int8 dot of twice the rows, which for one row also dodges XLA CPU's slow int8
    matrix-vector product (see quant.provider.two_rows)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, jnp.ones_like(amax), amax) / 127.0
    units = x / scale
    hi = jnp.round(units)
    lo = jnp.round((units - hi) * LO_UNITS)
    return jnp.concatenate([hi, lo]).astype(jnp.int8), scale


def quantize_groups(x: jax.Array, bits: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """x [rows, k] -> (q [rows, k // group_size, group_size] int8, scale [rows, k // group_size, 1] in x's dtype):
    AQT's activation quantizer per token and group (as its tiling calibrates it; the formula of
    quant.provider.fake_quantize), with the integers kept: q * scale is fake_quantize's output."""
    x = x.reshape(x.shape[0], x.shape[1] // group_size, group_size)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, jnp.ones_like(amax), amax) / (2.0 ** (bits - 1) - 0.5)
    inverse = jax.lax.reciprocal(scale)
    inverse = jnp.where(jnp.isinf(inverse), jnp.ones_like(inverse), inverse)
    bound = 2.0 ** (bits - 1) - 1
    q = jax.lax.round(jnp.clip(x * inverse, -bound, bound), jax.lax.RoundingMethod.TO_NEAREST_EVEN)
    return q.astype(jnp.int8), scale


def int_dot(q: jax.Array, value: jax.Array) -> jax.Array:
    """q [rows, k] int8 @ value [k, n] (int8 or int4 codes) -> [rows, n] float32 of the exact int32 sums."""
    dims = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(q, value.astype(jnp.int8), dims, preferred_element_type=jnp.int32).astype(jnp.float32)


def uses_int_path(plan: LayerPlan) -> bool:
    """Whether a served `int` layer of `plan` runs `served_int_matmul` on this backend: on CPU, every weight-only AQT
    layer, and per-group layers with act_bits (per-channel w8a8 stays AQT's own); per-group ones only up to
    GROUPED_MAX_ROWS rows (`dequantizes`). Other backends serve AQT's forms."""
    return jax.default_backend() == "cpu" and plan.scheme == "aqt" and (
        plan.act_bits is None or plan.group_size is not None)


def dequantizes(plan: LayerPlan, rows: int) -> bool:
    """Whether a served per-group layer with `rows` activation rows is faster as one float matmul over its weight
    dequantized (quant.provider.serve_fake) than as int8 dots, whatever its numerics: more than GROUPED_MAX_ROWS,
    on CPU (other backends serve AQT's forms)."""
    return jax.default_backend() == "cpu" and plan.group_size is not None and rows > GROUPED_MAX_ROWS


def served_int_matmul(stored: dict, x: jax.Array, plan: LayerPlan) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x's dtype, W from AQT's frozen {"value", "scale"} (per channel [k, n] and
    [1, n]; per group [groups, group_size, n] and [groups, 1, 1, n]), by int8 dots with exact int32 sums:

    - weight-only (act_bits None): x split into hi/lo int8 halves per row (`split_hi_lo`), one dot per channel
      layout or one per group, rescaled in float32. The only error against the float matmul over W is the split's,
      at most a 1.55e-5 part of each row's abs-max per element (tests/test_serve_int.py bounds it).
    - w{b}a{a} per group: x quantized per token and group exactly as AQT's SERVE forward does, one int8 dot per
      group, each rescaled by its activation and weight scales in float32 and summed: AQT's integer sums and
      scales, added in another order. One row gets a zero row appended (XLA CPU's int8 matrix-vector product is
      several times slower than two rows).
    """
    shape, value = x.shape, stored["value"]
    n = value.shape[-1]
    rows = x.reshape(-1, shape[-1])
    count = rows.shape[0]
    if plan.act_bits is None:
        q, row_scale = split_hi_lo(rows)
        combine = lambda acc: acc[:count] + acc[count:] / LO_UNITS
        if plan.group_size is None:
            y = combine(int_dot(q, value)) * stored["scale"].reshape(1, n).astype(jnp.float32)
        else:
            scale = stored["scale"].reshape(-1, n).astype(jnp.float32)
            size = plan.group_size
            y = sum(combine(int_dot(q[:, g * size:(g + 1) * size], value[g])) * scale[g]
                    for g in range(value.shape[0]))
        y = y * row_scale
    else:
        if count == 1:
            rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
        q, act_scale = quantize_groups(rows, plan.act_bits, plan.group_size)
        scale = stored["scale"].reshape(-1, n).astype(jnp.float32)
        act_scale = act_scale.astype(jnp.float32)
        y = sum(int_dot(q[:, g], value[g]) * act_scale[:, g] * scale[g] for g in range(value.shape[0]))[:count]
    return y.astype(x.dtype).reshape(shape[:-1] + (n,))
