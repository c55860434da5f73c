"""Building blocks of the Transformer: the linear layer with an injected `dot_general`, RMSNorm, RoPE.

Every projection of the model goes through `Linear`, so quantization (see `quant/`) is plugged in by handing
the model a `MatmulProvider` instead of editing the model: the model file stays a plain Transformer.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.config import RopeScaling

DotGeneral = Callable[..., jax.Array]


class MatmulProvider(Protocol):
    """What the model asks of a quantization scheme, per linear layer (identified by its module path).

    `dot_general(path)` is called inside the layer's compact `__call__`, so it may return an unbound Flax module
    (AQT's `AqtDotGeneral`), which then becomes a child of the layer, or a plain function.
    `keeps_float_kernel(path)` is False for serving layers whose weights live only as integers in the `aqt`
    collection: the layer then creates no float kernel at all.
    `embeds_by_matmul(path)` (optional; False if absent): the token embedding at `path` is computed as
    one_hot(tokens) @ table through a `Linear`, so that its table can be quantized like any weight.
    `embedding_lookup(path)` (optional; None if absent): for such a table stored as integers (serving), an unbound
    module `(ids, (vocab, features), dtype) -> rows [..., features]` that reads rows instead of multiplying.
    """

    def dot_general(self, path: tuple[str, ...]) -> DotGeneral: ...

    def keeps_float_kernel(self, path: tuple[str, ...]) -> bool: ...


# Set while tracing a loop body that applies the same weights every iteration (generate's decode step)
_WEIGHTS_LOOP_INVARIANT = contextvars.ContextVar("weights_loop_invariant", default=False)


@contextlib.contextmanager
def weights_loop_invariant() -> Iterator[None]:
    """Trace-time marker around a loop body that applies the same weights every iteration (`generate`'s decode
    step). A dot_general that derives its weight from stored values (quant's dequantized serving) may then leave
    the derivation loop-invariant, for XLA to compute once before the loop; outside such a body it ties it to the
    layer's input, so each layer's weight is made just before its matmul (see quant.provider.serve_fake)."""
    token = _WEIGHTS_LOOP_INVARIANT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_LOOP_INVARIANT.reset(token)


def in_weights_loop() -> bool:
    """Whether the current trace is inside `weights_loop_invariant`."""
    return _WEIGHTS_LOOP_INVARIANT.get()


def embeds_by_matmul(matmul: MatmulProvider | None, path: tuple[str, ...]) -> bool:
    return matmul is not None and getattr(matmul, "embeds_by_matmul", lambda _: False)(path)


def embedding_lookup(matmul: MatmulProvider | None, path: tuple[str, ...]):
    """The provider's row lookup for the embedding table at `path`, or None (see MatmulProvider)."""
    return None if matmul is None else getattr(matmul, "embedding_lookup", lambda _: None)(path)


class StoredEmbed(nn.Module):
    """A token embedding whose table only the provider holds (e.g. integer rows and scales): ids [...] int ->
    [..., features], read by the provider's `embedding_lookup`, which becomes this module's child."""

    num_embeddings: int
    features: int
    matmul: MatmulProvider
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        lookup = embedding_lookup(self.matmul, tuple(self.scope.path))
        return lookup(ids, (self.num_embeddings, self.features), self.dtype)


class Linear(nn.Module):
    """y = x @ W over the last axis of x, W of shape [in_features, features], through an injected dot_general.

    x: [..., in_features] -> y: [..., features]; the dot_general sees x as a matrix [tokens, in_features]."""

    features: int
    kernel_axes: tuple[str, str]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul: MatmulProvider | None = None
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)
    kernel_name: str = "kernel"  # "embedding" for a token embedding table computed as a matmul

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_shape = (x.shape[-1], self.features)
        path = tuple(self.scope.path)
        if self.matmul is None or self.matmul.keeps_float_kernel(path):
            kernel = self.param(
                self.kernel_name, nn.with_logical_partitioning(self.kernel_init, self.kernel_axes), kernel_shape, self.param_dtype
            )
        else:
            # Serving: the integer weights and scales are read by the dot_general from the `aqt` collection;
            # this placeholder is never read and is constant-folded away by XLA.
            kernel = jnp.zeros(kernel_shape, self.param_dtype)
        dot_general = jax.lax.dot_general if self.matmul is None else self.matmul.dot_general(path)
        # x is flattened to [tokens, in_features]: the weight gradient is then one [in, tokens] x [tokens, out]
        # matmul; with x's batch and sequence axes both contracted, XLA CPU first copies x into a transposed layout
        # (about 13% of a training step at nanoGPT's size). The per-token scales and per-group tiles of a quantized
        # dot_general contract the same last axis either way.
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        kernel = jnp.asarray(kernel, self.dtype)
        y = dot_general(x, kernel, (((1,), (0,)), ((), ())), precision=None, preferred_element_type=None)
        return y.reshape(*lead, self.features)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 for stability."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Inverse frequencies [head_dim // 2] (float32) of rotary position embeddings (Su et al., 2021).

    With `scaling` (Llama 3.1), low frequencies are divided by scaling.factor and the middle band is interpolated
    smoothly, as Hugging Face transformers' `_compute_llama3_parameters` computes them.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    medium = (wavelen >= original / scaling.high_freq_factor) & (wavelen <= original / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x: [batch, seq, heads, head_dim] by position-dependent angles.

    positions: [batch, seq] absolute token positions (they differ from arange during cached decoding); `theta` and
    `scaling` give the frequencies (see `rope_frequencies`).
    """
    head_dim = x.shape[-1]
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta, scaling)  # [b, s, d/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
