"""Autoregressive sampling with the KV cache: one prefill pass over the prompt, then one token per step.

The whole loop is one `jax.lax.scan` under `jit`, so decoding never re-runs the full sequence.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from slm_jax.attention import KVCache
from slm_jax.layers import weights_loop_invariant


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """logits: [batch, vocab] -> token ids [batch]. temperature 0 is greedy; top_k keeps the k likeliest."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def cache_size(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """Slots of `generate`'s KV cache: every token when they fit in the model's context, else the last context."""
    return min(model.cfg.context, prompt_len + max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "kv_bits"))
def generate(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, kv_bits: int | None = None) -> jax.Array:
    """prompt: [batch, prompt_len] int32 (at most the model's context) -> new tokens [batch, max_new_tokens].

    The KV cache holds `cache_size` slots, a sliding window of the last `context` tokens once they do not fit;
    kv_bits 8 stores it as int8 with a scale per token and KV head (see KVCache.init).
    """
    size = cache_size(model, prompt.shape[1], max_new_tokens)
    cache = KVCache.init(model.cfg, prompt.shape[0], model.dtype, size, kv_bits)
    logits, cache = model.apply(variables, prompt, cache=cache)
    first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)

    def step(carry, i):
        token, cache = carry
        with weights_loop_invariant():  # dequantized weights, if any, may be made once before the loop
            logits, cache = model.apply(variables, token[:, None], cache=cache)
        nxt = sample_logits(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k)
        return (nxt, cache), token

    _, tokens = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens + 1))
    return tokens.T  # [batch, max_new_tokens]
