"""Sampling: the radix select behind top-k against jax.lax.top_k, the inverse-transform draw against the softmax
probabilities it must follow, and chunked generation against generate."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax import ModelConfig, Transformer
from slm_jax.sampling import decode_chunk, generate, generate_chunks, radix_select, sample_logits, top_k_threshold


def awkward_rows(rng: np.random.Generator, shape) -> np.ndarray:
    """Random float32 logits with ties, infinities and both zeros mixed in."""
    x = rng.normal(size=shape).astype(np.float32) * 4
    x[0, :3] = -np.inf
    x[0, 3], x[0, 4] = -0.0, 0.0
    x[-1, 1] = np.inf
    x[1] = np.round(x[1])  # many ties
    return x


@pytest.mark.parametrize("shape,k", [((8, 256), 40), ((3, 7), 1), ((3, 7), 7), ((4, 1000), 999), ((2, 49), 13)])
def test_radix_select_equals_lax_top_k(shape, k):
    x = jnp.asarray(awkward_rows(np.random.default_rng(k), shape))
    found = np.asarray(jax.jit(radix_select, static_argnums=1)(x, k))
    expected = np.asarray(jax.lax.top_k(x, k)[0][..., -1:])
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(np.asarray(top_k_threshold(x, k)), expected)
    assert found.shape == (shape[0], 1) and found.dtype == np.float32


def test_radix_select_refuses_k_outside_the_row():
    for k in (0, 8):
        with pytest.raises(ValueError, match="k must be from 1 to the vocabulary size 7"):
            radix_select(jnp.zeros((2, 7)), k)


def test_sampling_follows_the_top_k_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, -jnp.inf, 1.5]], jnp.float32)
    draws = 100_000
    sample = jax.jit(jax.vmap(lambda key: sample_logits(logits, key, 0.7, 4)[0]))
    tokens = np.asarray(sample(jax.random.split(jax.random.PRNGKey(3), draws)))
    kept = np.array([0, 3, 7, 1])  # the four largest logits
    expected = np.zeros(8)
    expected[kept] = np.exp(np.asarray(logits)[0, kept] / 0.7)
    expected /= expected.sum()
    freq = np.bincount(tokens, minlength=8) / draws
    assert set(np.unique(tokens)) == set(kept.tolist())  # never a token outside the top 4
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(expected.max() / draws))  # 4 sigma


def test_greedy_and_full_vocabulary_sampling():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 64)), jnp.float32)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.PRNGKey(0), 0.0, None), np.argmax(logits, -1))
    tokens = jax.vmap(lambda key: sample_logits(logits, key, 1.0, None))(jax.random.split(jax.random.PRNGKey(1), 4000))
    assert tokens.dtype == jnp.int32 and tokens.shape == (4000, 5)
    # every row draws from its own distribution: the likeliest token of each row is drawn most often
    counts = np.stack([np.bincount(np.asarray(tokens)[:, row], minlength=64) for row in range(5)])
    np.testing.assert_array_equal(counts.argmax(-1), np.argmax(logits, -1))


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 5e-324])
def test_a_temperature_below_float32s_range_is_greedy(temperature):
    # 1e-300 is 0 in float32 (logits / 0: NaN), 1e-40 subnormal (XLA CPU flushes it to 0)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 64)), jnp.float32)
    for top_k in (None, 8):
        tokens = sample_logits(logits, jax.random.PRNGKey(0), temperature, top_k)
        np.testing.assert_array_equal(tokens, np.argmax(logits, -1))


def test_a_huge_temperature_draws_uniformly_from_the_kept_tokens():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, -jnp.inf, 1.5]], jnp.float32)
    sample = jax.jit(jax.vmap(lambda key: sample_logits(logits, key, 1e300, 4)[0]))
    tokens = np.asarray(sample(jax.random.split(jax.random.PRNGKey(3), 4000)))
    counts = np.bincount(tokens, minlength=8)
    assert set(np.unique(tokens)) == {0, 1, 3, 7} and counts[[0, 1, 3, 7]].min() > 850  # each about 1,000


def test_a_uniform_at_the_top_never_draws_a_token_without_probability(monkeypatch):
    # u * total can round up to the total; the draw must still land on the last token with any probability
    logits = jnp.asarray([[0.3, 5.0, 1.0, -jnp.inf, -jnp.inf], [1.0, 1.0, 1.0, 1.0, 1.0]], jnp.float32)
    almost_one = lambda key, shape: jnp.full(shape, np.nextafter(np.float32(1), np.float32(0)))
    monkeypatch.setattr(jax.random, "uniform", almost_one)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.PRNGKey(0), 1.0, None), [2, 4])
    np.testing.assert_array_equal(sample_logits(logits, jax.random.PRNGKey(0), 1.0, 1), [1, 4])  # ties all kept


@pytest.mark.parametrize("new,chunk,temperature,kv_bits", [(40, 16, 0.8, None), (40, 64, 0.0, None),
                                                           (37, 5, 1.0, 8), (3, 1, 0.8, None)])
def test_generate_chunks_yields_generates_tokens(new, chunk, temperature, kv_bits):
    """The chunks, joined, are generate's tokens exactly (same steps, draws and cache), past the 16-slot context's
    ring buffer; a chunk count that does not divide the tokens ends with a shorter chunk, with one compilation."""
    cfg = ModelConfig(vocab_size=256, seq_len=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64)
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 256)
    rng = jax.random.PRNGKey(3)
    expected = np.asarray(generate(model, params, prompt, rng, new, temperature, 40, kv_bits))
    compiled = decode_chunk._cache_size()
    chunks = list(generate_chunks(model, params, prompt, rng, new, temperature, 40, kv_bits, chunk=chunk))
    assert [c.shape for c in chunks] == [(2, min(chunk, new - i)) for i in range(0, new, chunk)]
    assert all(c.dtype == np.int32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), expected)
    assert decode_chunk._cache_size() == compiled + 1  # every chunk length ran the same compiled program
    chex.assert_shape(expected, (2, new))


def test_generate_chunks_refuses_an_empty_chunk():
    cfg = ModelConfig(vocab_size=256, seq_len=16, n_layers=1, n_heads=2, d_model=32)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        next(generate_chunks(Transformer(cfg), {}, jnp.zeros((1, 2), jnp.int32), jax.random.PRNGKey(0), 4, chunk=0))
