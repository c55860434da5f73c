"""Causal multi-head attention with rotary embeddings, grouped-query heads and a ring-buffer KV cache.

A query attends to at most `cfg.context` keys (the model's maximum context, by default its training window). The
cache keeps the last `size` keys/values with their absolute positions; because RoPE makes scores depend only on the
distance between positions, decoding past the context just keeps a sliding window of it. The cache holds keys and
values in a float dtype (`serving_cache_dtype`: float32 on CPU), or as int8 with one scale per token and KV head
(`bits=8`), the model's own format; attention over it runs in that float dtype, an int8 cache's scales applied to the
scores and probabilities. A decoding step reads the cache before it writes its own token's key and value, which
keeps XLA's update of the cache in place (see Attention._one_token_over_old_cache).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.config import ModelConfig
from slm_jax.layers import Linear, MatmulProvider, apply_rope


KV_BITS = (None, 8)
INT8_MAX = 127


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, size, head_dim], a float dtype or int8
    v: tuple[jax.Array, ...]
    positions: jax.Array  # [size] absolute position held in each slot, -1 while empty
    length: jax.Array  # [] int32, tokens written so far (the next token's position)
    k_scale: tuple[jax.Array, ...] = ()  # int8 cache only, per layer: [batch, kv_heads, size, 1], a float dtype
    v_scale: tuple[jax.Array, ...] = ()

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, dtype: Any = jnp.float32, size: int | None = None,
             bits: int | None = None) -> "KVCache":
        """An empty cache of `size` slots per layer (default: the model's context, cfg.context), keys and values
        [batch, kv_heads, size, head_dim] as in Hugging Face's cache (the einsums read a slot's head_dim contiguously).

        bits None keeps keys and values in `dtype`; bits 8 stores them as int8 with a `dtype` scale per token and
        KV head (symmetric abs-max over head_dim), about half the bytes of a bfloat16 cache. Attention over the cache
        runs in `dtype` (see serving_cache_dtype for the one generate picks). ValueError for other bits.
        """
        if bits not in KV_BITS:
            raise ValueError(f"KV cache bits must be None or 8, got {bits!r}")
        shape = (batch, cfg.kv_heads, size or cfg.context, cfg.head_dim)
        layers = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        empty = dict(positions=jnp.full((shape[2],), -1, jnp.int32), length=jnp.zeros((), jnp.int32))
        if bits is None:
            return cls(k=layers(shape, dtype), v=layers(shape, dtype), **empty)
        scales = layers(shape[:-1] + (1,), dtype)
        return cls(k=layers(shape, jnp.int8), v=layers(shape, jnp.int8), k_scale=scales, v_scale=scales, **empty)

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    @property
    def bits(self) -> int | None:
        return 8 if self.k_scale else None

    def layer(self, i: int) -> tuple[jax.Array, ...]:
        """Layer i's cache as Attention takes it: (k, v) or, int8, (k, v, k_scale, v_scale)."""
        if self.k_scale:
            return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]
        return self.k[i], self.v[i]

    def updated(self, layers: list[tuple[jax.Array, ...]], positions: jax.Array, length: jax.Array) -> "KVCache":
        """A cache holding `layers` (per layer, what `layer` returns) at `positions` after `length` tokens."""
        parts = tuple(zip(*layers))
        scales = dict(k_scale=parts[2], v_scale=parts[3]) if self.k_scale else {}
        return KVCache(k=parts[0], v=parts[1], positions=positions, length=length, **scales)

    def nbytes(self) -> int:
        """Bytes of the keys, values and scales of every layer (works on jax.eval_shape's abstract cache too)."""
        leaves = jax.tree_util.tree_leaves((self.k, self.v, self.k_scale, self.v_scale))
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves)


def serving_cache_dtype(compute_dtype: Any) -> Any:
    """The float dtype `generate` holds its KV cache (or an int8 cache's scales) in, and attends over it in: float32
    on CPU, the compute dtype elsewhere.

    XLA CPU has no bfloat16 arithmetic: it widens a bfloat16 cache to float32 for the one-token update (the whole
    cache, every layer, every decode step) and again for the attention einsums, which made attention over a bf16
    cache about 12x slower than over a float32 one at batch 8 in the bundled model (0.30 against 0.025 ms per layer
    and step, measured on this project's 2-core machine); a float32 cache costs twice the bytes instead."""
    return jnp.float32 if jax.default_backend() == "cpu" else compute_dtype


def quantize_kv(x: jax.Array, scale_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x: [..., head_dim] -> (int8 values [..., head_dim], scales [..., 1] in scale_dtype): symmetric abs-max per
    vector, x ~ values * scale with |values| <= 127. The scale is rounded to scale_dtype before dividing, so
    dequantizing with the stored scale is exact to int8 rounding. An all-zero vector gets scale 1."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(scale_dtype)
    values = jnp.clip(jnp.round(x32 / scale.astype(jnp.float32)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def dequantize_kv(values: jax.Array, scale: jax.Array) -> jax.Array:
    """values [..., head_dim] int8 times scale [..., 1] -> [..., head_dim] in the scale's dtype (quantize_kv's
    inverse)."""
    return values.astype(scale.dtype) * scale


def write_layer_cache(layer_cache: tuple[jax.Array, ...], slots: jax.Array, k: jax.Array, v: jax.Array):
    """Write k, v: [batch, seq, kv_heads, head_dim] into `slots` ([seq]) of a layer cache (see KVCache.layer).

    One token (decoding) is written with a dynamic_update_slice at its slot. The scatter `.at[slots].set` becomes
    on XLA CPU a select between the new values and the slot's old ones (for out-of-range indices), and reading the
    old slot before updating in place made XLA copy the whole cache, two to three times per layer and decode step
    at batch 1 (read off the compiled decode loop)."""
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
    if len(layer_cache) == 2:
        new = (k.astype(layer_cache[0].dtype), v.astype(layer_cache[1].dtype))
    else:
        (k_int, k_scale), (v_int, v_scale) = (quantize_kv(x, layer_cache[2].dtype) for x in (k, v))
        new = (k_int, v_int, k_scale, v_scale)
    if slots.shape[0] == 1:
        return tuple(jax.lax.dynamic_update_slice_in_dim(c, x, slots[0], axis=2) for c, x in zip(layer_cache, new))
    return tuple(c.at[:, :, slots].set(x) for c, x in zip(layer_cache, new))


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul: MatmulProvider | None = None

    def _einsum(self, name: str):
        """QK^T and attention x V use the injected dot_general only when `quantize_attention` asks for it."""
        if self.matmul is None or not self.cfg.quantize_attention:
            return jnp.einsum
        dot_general = self.matmul.dot_general((*self.scope.path, name))
        return lambda eq, a, b: jnp.einsum(eq, a, b, _dot_general=dot_general)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, layer_cache=None, slots=None, key_positions=None):
        """x: [batch, seq, embed]; positions: [seq] absolute positions of x's tokens.

        With `layer_cache` (see KVCache.layer: (k, v) of shape [batch, kv_heads, size, head_dim], plus their scales
        for an int8 cache), x's keys and values are written into `slots` and the queries attend, in the cache's float
        dtype, over every cached slot whose position (`key_positions`, [size]) is visible to them.
        Returns (y: [batch, seq, embed] in the compute dtype, new layer cache or None).
        """
        cfg = self.cfg
        batch, seq, _ = x.shape
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul=self.matmul)
        q = Linear(cfg.n_heads * cfg.head_dim, ("embed", "heads"), name="q", **dense)(x)
        k = Linear(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="k", **dense)(x)
        v = Linear(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="v", **dense)(x)
        rope = dict(theta=cfg.rope_theta, scaling=cfg.rope_scaling)
        q = apply_rope(q.reshape(batch, seq, cfg.n_heads, cfg.head_dim), positions[None], **rope)
        k = apply_rope(k.reshape(batch, seq, cfg.kv_heads, cfg.head_dim), positions[None], **rope)
        v = v.reshape(batch, seq, cfg.kv_heads, cfg.head_dim)

        key_scale = value_scale = None  # an int8 cache's per-key scales, [batch, kv_heads, 1, 1, keys]
        if layer_cache is None:
            new_cache, key_pos = None, positions
        else:
            math = layer_cache[-1].dtype  # attention over a cache runs in its float dtype (see serving_cache_dtype)
            if seq == 1 and not cfg.quantize_attention:  # decoding: read the cache, then write this token's k, v
                stored = (tuple(dequantize_kv(*quantize_kv(x, math)) for x in (k, v)) if len(layer_cache) == 4
                          else (k.astype(math), v.astype(math)))  # this token's key and value as the cache holds them
                visible = visible_keys(positions, key_positions, cfg.context)
                out = self._one_token_over_old_cache(q.astype(math), *stored, layer_cache, slots[0], visible)
                # the write comes after the reads. This token's k and v are quantized again for it, from the tied
                # values: writing the codes made above would leave XLA free to run the write first (and copy).
                after = jnp.isnan(out.reshape(-1)[0]).astype(k.dtype) * 0
                return self._out(out, dense), write_layer_cache(layer_cache, slots, k + after, v + after)
            new_cache, key_pos = write_layer_cache(layer_cache, slots, k, v), key_positions
            q, k, v = q.astype(math), new_cache[0].astype(math), new_cache[1].astype(math)
            if len(new_cache) == 4:  # int8: the scales multiply the scores and the probabilities, not the cache
                key_scale, value_scale = (scale[..., 0][:, :, None, None, :] for scale in new_cache[2:])
        visible = visible_keys(positions, key_pos, cfg.context)

        group = cfg.n_heads // cfg.kv_heads
        q = q.reshape(batch, seq, cfg.kv_heads, group, cfg.head_dim)
        kv_axes = "bkhd" if layer_cache is None else "bhkd"
        scores = self._einsum("qk")(f"bqhgd,{kv_axes}->bhgqk", q, k.astype(q.dtype)).astype(jnp.float32)
        if key_scale is not None:
            scores = scores * key_scale.astype(jnp.float32)
        probs = softmax_visible(scores, visible, cfg.head_dim).astype(q.dtype)
        if value_scale is not None:
            probs = probs * value_scale
        out = self._einsum("pv")(f"bhgqk,{kv_axes}->bqhgd", probs, v.astype(q.dtype)).astype(self.dtype)
        return self._out(out, dense), new_cache

    def _out(self, out: jax.Array, dense: dict) -> jax.Array:
        """The output projection: the heads' outputs [batch, seq, kv_heads, group, head_dim] -> [batch, seq, embed]."""
        batch, seq = out.shape[:2]
        out = out.astype(self.dtype).reshape(batch, seq, self.cfg.n_heads * self.cfg.head_dim)
        return Linear(self.cfg.d_model, ("heads", "embed"), name="o", **dense)(out)

    def _one_token_over_old_cache(self, q, k, v, layer_cache, slot, visible):
        """One query token's attention (q [batch, 1, heads, head_dim]) over a KV cache as it was before this token's
        write (`layer_cache`, see KVCache.layer), its `slot` holding this token's own key and value instead (k, v
        [batch, 1, kv_heads, head_dim], as the cache will hold them: an int8 cache's dequantized). -> [batch, 1,
        kv_heads, group, head_dim] in the cache's float dtype.

        The same sums as attending over the updated cache. But where attention read the updated cache, XLA CPU fused
        the in-place slot update into each reader (an int8 cache's conversion to float, a float cache's reshape at
        batch 1), so every decode step copied every layer's K and V two or three times (an int8 cache decoded at
        0.5-0.7x a float32 cache's speed at batch 8 in the bundled model). Read before the write, and the write tied
        to the result (isnan(out[0]) * 0 added to the new key and value: an exact zero XLA does not fold, so it can
        tell that the reads come first), the update stays in place."""
        cfg = self.cfg
        math = layer_cache[-1].dtype
        batch = q.shape[0]
        q = q.reshape(batch, 1, cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim)
        old_k, old_v = (c.astype(math) for c in layer_cache[:2])
        is_new = (jnp.arange(old_k.shape[2]) == slot)  # [size]
        scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, old_k).astype(jnp.float32)
        if len(layer_cache) == 4:  # int8: the scales multiply the scores and the probabilities, not the cache
            scores = scores * layer_cache[2][..., 0][:, :, None, None, :].astype(jnp.float32)
        own = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32)  # [batch, kv_heads, group, 1, 1]
        probs = softmax_visible(jnp.where(is_new, own, scores), visible, cfg.head_dim).astype(math)
        own_p = jnp.sum(jnp.where(is_new, probs, 0), axis=-1, keepdims=True)
        old_p = jnp.where(is_new, 0, probs)
        if len(layer_cache) == 4:
            old_p = old_p * layer_cache[3][..., 0][:, :, None, None, :]
        return jnp.einsum("bhgqk,bhkd->bqhgd", old_p, old_v) + jnp.einsum("bhgqk,bkhd->bqhgd", own_p, v)


def visible_keys(positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """[seq, keys] bool: key j is visible to query i when it holds a token (position >= 0) at most i's position
    and less than `window` positions before it."""
    keys, queries = key_positions[None, :], positions[:, None]
    return (keys >= 0) & (keys <= queries) & (keys > queries - window)


def softmax_visible(scores: jax.Array, visible: jax.Array, head_dim: int) -> jax.Array:
    """softmax over the last axis of scores [..., seq, keys] / sqrt(head_dim), keys not `visible` ([seq, keys])
    left out; float32."""
    scores = scores.astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
    return jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
