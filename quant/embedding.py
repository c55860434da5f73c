"""A served (integer) token embedding read by row: gather the integer rows of the tokens and dequantize them.

Computing it as one_hot(tokens) @ table, as QAT and conversion do, costs vocab x d_model per token (49,152 x 576 for
SmolLM2-135M) and a [batch, seq, vocab] one-hot array; a gather costs d_model. The variables are exactly those AQT's
legacy freezer keeps for that matmul (`dot_general/aqt/qrhs/{value, scale}`), so serving checkpoints are unchanged.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.utils import QuantMode


class StoredTable(nn.Module):
    """The frozen weight of one AQT dot_general, under the names AQT gives it: returns (value, scale)."""

    value_shape: tuple[int, ...]
    value_dtype: Any
    scale_shape: tuple[int, ...]
    scale_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        frozen = aqt_flax.Freezer(
            quant_collection="aqt", quant_mode=QuantMode.SERVE, q_shape=self.value_shape, q_dtype=self.value_dtype,
            q_init=jnp.zeros, s_shape=self.scale_shape, s_init=lambda shape: jnp.zeros(shape, self.scale_dtype),
            name="qrhs").get()
        return frozen.qvalue, frozen.scale_t[0]


class ServedEmbedding(nn.Module):
    """ids: [...] int -> rows [..., features] in `dtype`: value[ids] * scale, as AQT dequantizes the served table.

    value: [vocab, features] integers (`value_dtype`, e.g. int8 or int4); scale: one per column, stored in AQT's
    output-shaped layout [1] * ids.ndim + [features] (`scale_dtype`). The product value * scale is taken in the dtype
    AQT takes it in for the same `numerics` (`fake`: the scale's dtype, as it dequantizes the table before a float
    matmul; `int`: the promotion of `dtype` and the scale's dtype, as it rescales the matmul's output), then cast to
    `dtype`: bit for bit the numbers of one_hot(ids) @ table.
    """

    value_dtype: Any
    scale_dtype: Any
    numerics: str = "fake"

    @nn.compact
    def __call__(self, ids: jax.Array, table_shape: tuple[int, int], dtype: Any) -> jax.Array:
        vocab, features = table_shape
        value, scale = StoredTable(table_shape, self.value_dtype, (1,) * ids.ndim + (features,), self.scale_dtype,
                                   name="aqt")()
        product = scale.dtype if self.numerics == "fake" else jnp.promote_types(dtype, scale.dtype)
        rows = jnp.take(value, ids, axis=0).astype(product)  # [..., features]
        return (rows * scale.reshape(features).astype(product)).astype(dtype)
