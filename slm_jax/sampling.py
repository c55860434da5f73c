"""Autoregressive sampling with the KV cache: one prefill pass over the prompt, then one token per step.

`generate` is one XLA program (prefill, then a scan of decode steps), so decoding never re-runs the full sequence;
`generate_chunks` runs the same steps a chunk of them per compiled call, so a command can stop or report between.
"""
from __future__ import annotations

import functools
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.attention import KVCache, serving_cache_dtype
from slm_jax.layers import weights_loop_invariant


def top_k_threshold(logits: jax.Array, k: int) -> jax.Array:
    """logits: [..., vocab] float32 -> [..., 1] float32, the k-th largest value of each row (k in [1, vocab]),
    exactly `jax.lax.top_k(logits, k)[0][..., -1:]`.

    On CPU, XLA lowers top_k to a full sort of the row, which takes about 0.5 ms for 8 rows of 256 and 94 ms for 8 rows
    of 49,152 (SmolLM2's vocabulary) on this project's 2-core machine: more than a whole decode step. There the value
    is found by a radix select instead: the floats are mapped to unsigned integers of the same order, and the k-th
    largest key is built bit by bit from the top, keeping a bit when at least k keys reach the prefix with it set
    (32 compare-and-count passes over the row, 13-14x faster at both sizes). Other backends keep top_k."""
    if jax.default_backend() != "cpu":
        return jax.lax.top_k(logits, k)[0][..., -1:]
    return radix_select(logits, k)


def radix_select(logits: jax.Array, k: int) -> jax.Array:
    """The k-th largest value of each row of float32 `logits` [..., vocab] -> [..., 1], by a 32-pass radix select
    (see top_k_threshold); -inf and +inf take part like any value. Raises ValueError unless 1 <= k <= vocab."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be from 1 to the vocabulary size {logits.shape[-1]}, got {k}")
    bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    keys = jnp.where(bits >= sign, ~bits, bits | sign)  # the floats' order as unsigned integers

    def keep_bit(i, prefix):  # bit 31 - i, from the top
        candidate = prefix | jnp.left_shift(jnp.uint32(1), jnp.uint32(31 - i))
        return jnp.where(jnp.sum(keys >= candidate, axis=-1, keepdims=True) >= k, candidate, prefix)

    prefix = jax.lax.fori_loop(0, 32, keep_bit, jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32))
    bits = jnp.where(prefix >= sign, prefix & ~sign, ~prefix)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """logits: [batch, vocab] -> token ids [batch] int32. temperature 0 is greedy; top_k keeps the k likeliest
    (with every token tied with the k-th).

    A token is drawn from softmax(logits / temperature) over the kept tokens by inverse transform sampling: one
    uniform number per row against the cumulative probabilities, as torch.multinomial does, instead of
    jax.random.categorical's Gumbel noise for every vocabulary entry, whose random bits cost more than the model's
    decode step on CPU (0.25 ms for 8 rows of 256 entries, 17 ms for 8 of 49,152)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:  # a positive temperature keeps the order
        logits = jnp.where(logits < top_k_threshold(logits, top_k), -jnp.inf, logits)
    # each logit's gap to its row's largest times 1 / temperature held in float32's normal range (XLA CPU flushes
    # subnormals to zero): the likeliest token keeps 0, so a tiny temperature tends to greedy and a huge one to
    # uniform over the kept tokens, never 0 / 0 or -inf * 0 (NaN)
    tiny = float(np.finfo(np.float32).tiny)
    inverse = np.float32(min(max(1.0 / float(temperature), tiny), 1.0 / tiny))
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) * inverse
    probs = jnp.exp(logits)
    cumulative = jnp.cumsum(probs, axis=-1)
    point = jax.random.uniform(rng, logits.shape[:-1] + (1,)) * cumulative[..., -1:]
    # the first token whose cumulative probability passes the point; never past the last token with any probability
    last = logits.shape[-1] - 1 - jnp.argmax(probs[..., ::-1] > 0, axis=-1)
    return jnp.minimum(jnp.sum(cumulative <= point, axis=-1), last).astype(jnp.int32)


def cache_size(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """Slots of `generate`'s KV cache: every token when they fit in the model's context, else the last context."""
    return min(model.cfg.context, prompt_len + max_new_tokens)


def prefill(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, size: int, temperature: float,
            top_k: int | None, kv_bits: int | None) -> tuple[jax.Array, KVCache]:
    """The prompt's pass: prompt [batch, prompt_len] int32 -> (the first new token [batch] int32, drawn with
    fold_in(rng, 0); the KV cache of `size` slots holding the prompt)."""
    cache = KVCache.init(model.cfg, prompt.shape[0], serving_cache_dtype(model.dtype), size, kv_bits)
    logits, cache = model.apply(variables, prompt, cache=cache)
    return sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k), cache


def decode_step(model: nn.Module, variables, rng: jax.Array, temperature: float, top_k: int | None,
                token: jax.Array, cache: KVCache, i: jax.Array) -> tuple[jax.Array, KVCache]:
    """Decode step i (from 1): token [batch] int32 through the model with the cache -> (the next token, drawn with
    fold_in(rng, i); the cache holding `token`)."""
    with weights_loop_invariant():  # dequantized weights, if any, may be made once before the loop
        logits, cache = model.apply(variables, token[:, None], cache=cache)
    return sample_logits(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k), cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "kv_bits"))
def generate(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, kv_bits: int | None = None) -> jax.Array:
    """prompt: [batch, prompt_len] int32 (at most the model's context) -> new tokens [batch, max_new_tokens].

    One XLA program: the prompt's prefill, then a scan of decode steps. The KV cache holds `cache_size` slots, a
    sliding window of the last `context` tokens once they do not fit; kv_bits 8 stores it as int8 with a scale per
    token and KV head (see KVCache.init). `generate_chunks` yields the same tokens a chunk at a time.
    """
    size = cache_size(model, prompt.shape[1], max_new_tokens)
    first, cache = prefill(model, variables, prompt, rng, size, temperature, top_k, kv_bits)

    def step(carry, i):
        token, cache = carry
        return decode_step(model, variables, rng, temperature, top_k, token, cache, i), token

    _, tokens = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens + 1))
    return tokens.T  # [batch, max_new_tokens]


# Decode steps per compiled call of generate_chunks: control returns to Python (where a Ctrl-C is seen and progress
# reported) at least this often.
DECODE_CHUNK = 64


jitted_prefill = jax.jit(prefill, static_argnames=("model", "size", "temperature", "top_k", "kv_bits"))


@functools.partial(jax.jit, static_argnames=("model", "chunk", "temperature", "top_k"), donate_argnames=("cache",))
def decode_chunk(model: nn.Module, variables, token: jax.Array, cache: KVCache, rng: jax.Array, start: jax.Array,
                 steps: jax.Array, chunk: int, temperature: float, top_k: int | None):
    """Decode steps start .. start + steps - 1 (steps <= chunk, a traced count: one compilation serves every chunk
    length) from `token` [batch] -> (the token after them, the cache, [batch, chunk] int32 whose first `steps`
    columns are the tokens fed to those steps, as generate emits them). The cache is donated."""
    def body(j, carry):
        token, cache, out = carry
        nxt, cache = decode_step(model, variables, rng, temperature, top_k, token, cache, start + j)
        return nxt, cache, jax.lax.dynamic_update_index_in_dim(out, token, j, axis=1)

    out = jnp.zeros((token.shape[0], chunk), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (token, cache, out))


def generate_chunks(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None, kv_bits: int | None = None,
                    chunk: int = DECODE_CHUNK) -> Iterator[np.ndarray]:
    """generate's tokens as numpy int32 arrays [batch, n] of at most `chunk` columns each, max_new_tokens in all: the
    same steps, random draws and cache, one compiled call per chunk, so the caller regains control between chunks
    (Ctrl-C, progress). Raises ValueError for chunk < 1."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    size = cache_size(model, prompt.shape[1], max_new_tokens)
    token, cache = jitted_prefill(model, variables, prompt, rng, size, temperature, top_k, kv_bits)
    done = 0
    while done < max_new_tokens:
        steps = min(chunk, max_new_tokens - done)
        token, cache, out = decode_chunk(model, variables, token, cache, rng, jnp.int32(done + 1), jnp.int32(steps),
                                         chunk, temperature, top_k)
        yield np.asarray(out)[:, :steps]
        done += steps
