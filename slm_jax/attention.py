"""Causal multi-head attention with rotary embeddings, grouped-query heads and a ring-buffer KV cache.

A query attends to at most `cfg.context` keys (the model's maximum context, by default its training window). The
cache keeps the last `size` keys/values with their absolute positions; because RoPE makes scores depend only on the
distance between positions, decoding past the context just keeps a sliding window of it.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.config import ModelConfig
from slm_jax.layers import Linear, MatmulProvider, apply_rope


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [batch, size, kv_heads, head_dim]
    v: tuple[jax.Array, ...]
    positions: jax.Array  # [size] absolute position held in each slot, -1 while empty
    length: jax.Array  # [] int32, tokens written so far (the next token's position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, dtype: Any = jnp.float32, size: int | None = None) -> "KVCache":
        """An empty cache of `size` slots per layer (default: the model's context, cfg.context)."""
        shape = (batch, size or cfg.context, cfg.kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return cls(k=zeros, v=zeros, positions=jnp.full((shape[1],), -1, jnp.int32), length=jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.positions.shape[0]


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

        With `layer_cache` = (k, v) of shape [batch, size, kv_heads, head_dim], x's keys and values are written
        into `slots` and the queries attend over every cached slot whose position (`key_positions`, [size])
        is visible to them. Returns (y: [batch, seq, embed], new layer cache or None).
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

        if layer_cache is None:
            new_cache, key_pos = None, positions
        else:
            k = layer_cache[0].at[:, slots].set(k.astype(layer_cache[0].dtype))
            v = layer_cache[1].at[:, slots].set(v.astype(layer_cache[1].dtype))
            new_cache, key_pos = (k, v), key_positions
        window = cfg.context
        visible = (key_pos[None, :] >= 0) & (key_pos[None, :] <= positions[:, None]) & (
            key_pos[None, :] > positions[:, None] - window)  # [seq, keys]

        group = cfg.n_heads // cfg.kv_heads
        q = q.reshape(batch, seq, cfg.kv_heads, group, cfg.head_dim)
        scores = self._einsum("qk")("bqhgd,bkhd->bhgqk", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = self._einsum("pv")("bhgqk,bkhd->bqhgd", probs, v.astype(self.dtype))
        out = out.reshape(batch, seq, cfg.n_heads * cfg.head_dim)
        y = Linear(cfg.d_model, ("heads", "embed"), name="o", **dense)(out)
        return y, new_cache
