"""The int8 KV cache: its layout and bytes, its quantizer against numpy, and cached decoding against the float cache
over a generation that wraps the ring buffer several times."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant.config import QuantConfig
from slm_jax import KVCache, ModelConfig, Transformer
from slm_jax.attention import Attention, quantize_kv
from slm_jax.errors import UserError
from slm_jax.layers import apply_rope
from slm_jax.sampling import generate

CFG = ModelConfig(vocab_size=256, seq_len=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, tie_embeddings=False)


def test_int8_cache_layout_and_bytes():
    cache = KVCache.init(CFG, 3, jnp.bfloat16, bits=8)
    values, scales = (3, 2, 16, 16), (3, 2, 16, 1)  # [batch, kv_heads, slots, head_dim]
    chex.assert_shape(cache.k + cache.v, values)
    chex.assert_shape(cache.k_scale + cache.v_scale, scales)
    chex.assert_type(cache.k + cache.v, jnp.int8)
    chex.assert_type(cache.k_scale + cache.v_scale, jnp.bfloat16)
    assert cache.bits == 8 and KVCache.init(CFG, 3, jnp.bfloat16).bits is None
    float_bytes = KVCache.init(CFG, 3, jnp.bfloat16).nbytes()
    assert float_bytes == 2 * CFG.n_layers * 2 * np.prod(values)  # (k, v) x layers x bfloat16
    # int8 values are exactly half of the bfloat16 cache; a bfloat16 scale per token and head adds 2 / head_dim of it
    assert cache.nbytes() == float_bytes // 2 + 2 * CFG.n_layers * 2 * np.prod(scales)
    assert cache.nbytes() / float_bytes == pytest.approx(0.5 + 1 / CFG.head_dim)
    with pytest.raises(ValueError, match="bits"):
        KVCache.init(CFG, 1, bits=4)


def test_kv_bits_config_is_validated():
    assert QuantConfig(kv_bits=8).kv_bits == 8
    for bad in (4, 16, True, "8"):
        with pytest.raises(UserError, match="quant.kv_bits"):
            QuantConfig(kv_bits=bad)


def test_quantize_kv_matches_numpy_abs_max():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 16))) * np.array([0.01, 1, 30])[:, None]
    x[0, 0, 0] = 0.0  # an all-zero vector
    values, scale = quantize_kv(jnp.asarray(x), jnp.float32)
    amax = np.abs(x).max(-1, keepdims=True)
    expected_scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(values), np.clip(np.round(x / expected_scale), -127, 127))
    assert np.abs(np.asarray(values)).max() == 127
    error = np.abs(np.asarray(values) * np.asarray(scale) - x)
    assert np.all(error <= np.asarray(scale) / 2 + 1e-7)


def test_int8_cache_decoding_tracks_the_float_cache_past_the_ring_buffer():
    """Greedy decoding with the float cache for 56 tokens through a 16-slot cache (it wraps three times); the same
    tokens fed through an int8 cache give logits within a small fraction of their spread and the same top-1."""
    model = Transformer(CFG)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, CFG.seq_len), jnp.int32)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 256)
    new = generate(model, params, prompt, jax.random.PRNGKey(2), 56, temperature=0.0)
    seq = jnp.concatenate([prompt, new], axis=1)

    @jax.jit
    def decode(params, seq, cache):  # prefill the prompt, then one token per step: logits [batch, 56, vocab]
        logits, cache = model.apply(params, seq[:, :8], cache=cache)

        def step(cache, token):
            logits, cache = model.apply(params, token[:, None], cache=cache)
            return cache, logits[:, -1]

        cache, rest = jax.lax.scan(step, cache, seq[:, 8:-1].T)
        return jnp.concatenate([logits[:, -1:], rest.transpose(1, 0, 2)], axis=1), cache

    reference, float_cache = decode(params, seq, KVCache.init(CFG, 2))
    int8, int8_cache = decode(params, seq, KVCache.init(CFG, 2, bits=8))
    reference, int8 = np.asarray(reference), np.asarray(int8)
    assert int(int8_cache.length) == int(float_cache.length) == seq.shape[1] - 1 and int8_cache.bits == 8
    np.testing.assert_array_equal(int8_cache.positions, float_cache.positions)
    np.testing.assert_array_equal(reference.argmax(-1), np.asarray(new))  # the float cache reproduces generate
    error = np.abs(int8 - reference).max() / reference.std(-1).min()
    assert 0 < error < 0.05  # measured 0.015: the int8 cache really quantizes, and only slightly
    assert (int8.argmax(-1) == reference.argmax(-1)).mean() >= 0.95  # measured 0.99 (one near-tie of 112)


@pytest.mark.parametrize("bits", [None, 8])
def test_one_decoded_token_is_attention_over_the_updated_cache(bits):
    """A decode step over a full cache (the ring buffer's slot 5 overwritten, slot 9 still empty; float32, or int8
    with scales) against numpy: softmax(q k^T / sqrt(d)) v over every visible slot of the updated cache (dequantized),
    and the written cache holds exactly the new key and value (quantize_kv of them) at the slot, the rest unchanged.
    The step reads the cache before writing it (Attention._one_token_over_old_cache)."""
    cfg, size, batch, slot = CFG, 12, 2, 5
    attn = Attention(cfg)
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, 1, cfg.d_model))
    params = nn.unbox(attn.init(jax.random.PRNGKey(4), x, jnp.zeros((1,), jnp.int32)))
    old = [jax.random.normal(key, (batch, cfg.kv_heads, size, cfg.head_dim)) for key in jax.random.split(
        jax.random.PRNGKey(5), 2)]
    if bits == 8:
        (k_values, k_scales), (v_values, v_scales) = (quantize_kv(t, jnp.float32) for t in old)
        layer_cache = (k_values, v_values, k_scales, v_scales)
    else:
        layer_cache = tuple(old)
    position = 40
    key_positions = jnp.arange(28, 28 + size).at[slot].set(position).at[9].set(-1)  # slot 9 never written
    y, written = attn.apply(params, x, jnp.array([position]), layer_cache, jnp.array([slot]), key_positions)
    chex.assert_shape(y, (batch, 1, cfg.d_model))
    chex.assert_shape(written[:2], (batch, cfg.kv_heads, size, cfg.head_dim))
    chex.assert_shape(written[2:], (batch, cfg.kv_heads, size, 1))
    chex.assert_trees_all_equal_dtypes(written, layer_cache)

    p = jax.tree_util.tree_map(np.asarray, params["params"])
    xs = np.asarray(x)[:, 0]
    rope = lambda t, heads: np.asarray(apply_rope(jnp.asarray(t).reshape(batch, 1, heads, cfg.head_dim),
                                                  jnp.array([[position]]), cfg.rope_theta))[:, 0]
    q, k = rope(xs @ p["q"]["kernel"], cfg.n_heads), rope(xs @ p["k"]["kernel"], cfg.kv_heads)
    v = (xs @ p["v"]["kernel"]).reshape(batch, cfg.kv_heads, cfg.head_dim)
    new = [k, v]  # what the slot must hold, [batch, kv_heads, head_dim (or 1)], in layer_cache's order
    if bits == 8:
        (k_values, k_scales), (v_values, v_scales) = (quantize_kv(jnp.asarray(t), jnp.float32) for t in new)
        new = [k_values, v_values, k_scales, v_scales]
    others = np.arange(size) != slot
    for stored, before, expected in zip(written, layer_cache, new):
        np.testing.assert_allclose(np.asarray(stored)[:, :, slot], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(stored)[:, :, others], np.asarray(before)[:, :, others])
    if bits == 8:
        np.testing.assert_array_equal(written[0][:, :, slot], new[0])  # the int8 codes bit for bit
    keys_values = [np.asarray(written[i], np.float64) * (np.asarray(written[i + 2], np.float64) if bits else 1)
                   for i in (0, 1)]
    group = cfg.n_heads // cfg.kv_heads
    heads = []
    for h in range(cfg.n_heads):
        kh, vh = keys_values[0][:, h // group], keys_values[1][:, h // group]  # [batch, size, head_dim]
        scores = np.einsum("bd,bkd->bk", q[:, h], kh) / np.sqrt(cfg.head_dim)
        scores[:, np.asarray(key_positions) < 0] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(np.einsum("bk,bkd->bd", weights / weights.sum(-1, keepdims=True), vh))
    expected = np.concatenate(heads, axis=-1) @ p["o"]["kernel"]
    np.testing.assert_allclose(np.asarray(y)[:, 0], expected, rtol=1e-4, atol=1e-5)
