"""A Llama-style decoder-only Transformer: embed -> [RMSNorm -> attention, RMSNorm -> SwiGLU] x L -> norm -> head.

Quantization never changes this file: each projection is a `Linear` that asks the optional `MatmulProvider`
for its dot_general. The token embedding is a table lookup, or, when the provider quantizes the table,
one_hot(tokens) @ table through a `Linear` (same parameter), and a lookup of the provider's stored integer rows
once the table is served as integers.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.attention import Attention, KVCache
from slm_jax.config import ModelConfig
from slm_jax.layers import Linear, MatmulProvider, RMSNorm, StoredEmbed, embedding_lookup, embeds_by_matmul


class SwiGLU(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul: MatmulProvider | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul=self.matmul)
        gate = Linear(self.cfg.hidden, ("embed", "mlp"), name="gate", **dense)(x)
        up = Linear(self.cfg.hidden, ("embed", "mlp"), name="up", **dense)(x)
        return Linear(self.cfg.d_model, ("mlp", "embed"), name="down", **dense)(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matmul: MatmulProvider | None = None

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, layer_cache=None, slots=None, key_positions=None):
        cfg, sub = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.norm_eps, name="attn_norm", **sub)(x)
        h, new_cache = Attention(cfg, matmul=self.matmul, name="attn", **sub)(
            h, positions, layer_cache, slots, key_positions)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        h = SwiGLU(cfg, matmul=self.matmul, name="mlp", **sub)(RMSNorm(cfg.norm_eps, name="mlp_norm", **sub)(x))
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return x, new_cache


class Transformer(nn.Module):
    """tokens: [batch, seq] int -> logits: [batch, seq, vocab] float32 (and the updated KV cache, if one is given)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    matmul: MatmulProvider | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, cache: KVCache | None = None, deterministic: bool = True):
        cfg, sub = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        seq = tokens.shape[1]
        quantized_table = embeds_by_matmul(self.matmul, ("embed",))
        if quantized_table and cfg.tie_embeddings:
            raise ValueError("a quantized embedding table cannot be tied to the LM head")
        if embedding_lookup(self.matmul, ("embed",)) is not None:
            x = StoredEmbed(cfg.vocab_size, cfg.d_model, self.matmul, self.dtype, name="embed")(tokens)
        elif quantized_table:
            table = Linear(cfg.d_model, ("vocab", "embed"), name="embed", matmul=self.matmul,
                           kernel_name="embedding", **sub)
            x = table(jax.nn.one_hot(tokens, cfg.vocab_size, dtype=self.dtype))
        else:
            embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed", embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")), **sub)
            # the lookup reads the whole table, as each matmul reads its whole kernel: a table split along embed
            # (fsdp) made the sharded train step's gradient scatter-add all-gather the [batch, seq, embed] cotangent
            # ("[SPMD] Involuntary full rematerialization"); a no-op unless the caller sets logical axis rules
            table = nn.with_logical_constraint(jnp.asarray(embed.embedding, self.dtype), (None, None))
            x = jnp.take(table, tokens, axis=0)  # nn.Embed.__call__'s lookup: the same values
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

        if cache is None:
            positions, slots, key_positions = jnp.arange(seq), None, None
        else:
            positions = cache.length + jnp.arange(seq)
            slots = positions % cache.size
            key_positions = cache.positions.at[slots].set(positions)
        new_layers = []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else cache.layer(i)
            x, updated = Block(cfg, matmul=self.matmul, name=f"layer_{i}", **sub)(
                x, positions, deterministic, layer_cache, slots, key_positions)
            new_layers.append(updated)
        x = RMSNorm(cfg.norm_eps, name="final_norm", **sub)(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)  # a tied head shares the (float) embedding table
        else:
            logits = Linear(cfg.vocab_size, ("embed", "vocab"), name="lm_head", matmul=self.matmul, **sub)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits, None
        return logits, cache.updated(new_layers, key_positions, cache.length + seq)
