"""What an imported Llama needs from the model: head width apart from d_model / n_heads, Llama 3.1 rope scaling,
a maximum context apart from the training window, and a served integer embedding read by row."""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant.config import QuantConfig
from quant.serving import convert
from quant.provider import make_matmul
from slm_jax import KVCache, ModelConfig, Transformer
from slm_jax.config import RopeScaling
from slm_jax.errors import UserError
from slm_jax.layers import rope_frequencies


def init(cfg):
    model = Transformer(cfg)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))


def test_head_size_sets_the_attention_width_apart_from_d_model():
    cfg = ModelConfig(vocab_size=256, seq_len=8, n_layers=1, n_heads=4, n_kv_heads=2, d_model=32, head_size=12)
    assert cfg.head_dim == 12
    model, variables = init(cfg)
    attn = variables["params"]["layer_0"]["attn"]
    chex.assert_shape(attn["q"]["kernel"], (32, 48))
    chex.assert_shape(attn["k"]["kernel"], (32, 24))
    chex.assert_shape(attn["o"]["kernel"], (48, 32))
    chex.assert_shape(KVCache.init(cfg, 2).k[0], (2, 2, 8, 12))
    logits, _ = jax.jit(model.apply)(variables, jnp.zeros((2, 8), jnp.int32))
    chex.assert_shape(logits, (2, 8, 256))
    assert ModelConfig(d_model=30, n_heads=4, head_size=8).head_dim == 8  # n_heads need not divide d_model
    with pytest.raises(UserError, match="head_size"):
        ModelConfig(head_size=7)


def llama3_reference(head_dim, theta, factor, low, high, original):
    """Llama 3.1's frequency scaling written out per frequency in float64 (Meta's reference `apply_scaling`)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_rope_scaling_matches_the_reference_formula_in_all_three_bands():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    got = np.asarray(rope_frequencies(32, 10000.0, scaling))
    expected = llama3_reference(32, 10000.0, 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    plain = np.asarray(rope_frequencies(32, 10000.0))
    wavelen = 2 * np.pi / plain
    assert (got == plain)[wavelen < 16].any() and np.allclose(got[wavelen > 64], plain[wavelen > 64] / 8)
    assert ((wavelen >= 16) & (wavelen <= 64)).any()  # the smoothed band is exercised too
    with pytest.raises(UserError, match="rope_scaling.type"):
        RopeScaling(type="yarn")


def logits_of(cfg, variables, tokens):
    return jax.jit(Transformer(cfg).apply)(variables, tokens)[0]


def test_max_context_lets_a_plain_forward_see_past_the_training_window():
    short = ModelConfig(vocab_size=256, seq_len=8, n_layers=1, n_heads=2, d_model=16, tie_embeddings=False)
    long = ModelConfig(**{**short.__dict__, "max_context": 32})
    _, variables = init(short)
    x = jax.random.randint(jax.random.PRNGKey(1), (1, 24), 0, 256)
    y = x.at[0, 0].set((x[0, 0] + 1) % 256)
    # Without max_context the last position only sees the last seq_len keys, as before: token 0 is out of reach.
    np.testing.assert_array_equal(logits_of(short, variables, x)[0, -1], logits_of(short, variables, y)[0, -1])
    assert float(jnp.abs(logits_of(long, variables, x)[0, -1] - logits_of(long, variables, y)[0, -1]).max()) > 0
    # The default cache holds the whole context, and decoding through it equals the full forward.
    cache = KVCache.init(long, 1)
    assert cache.size == 32
    apply = jax.jit(Transformer(long).apply)
    _, cache = apply(variables, x[:, :20], cache=cache)
    out, _ = apply(variables, x[:, 20:], cache=cache)
    np.testing.assert_allclose(out, logits_of(long, variables, x)[:, 20:], atol=1e-5)
    with pytest.raises(UserError, match="max_context"):
        ModelConfig(seq_len=16, max_context=8)


class OneHotEmbedding:
    """The serving provider with its row lookup switched off: the embedding goes through one_hot @ table."""

    def __init__(self, provider):
        self.provider = provider

    def __getattr__(self, name):
        if name == "embedding_lookup":
            return lambda path: None
        return getattr(self.provider, name)


@pytest.mark.parametrize("bits,numerics,scale_dtype,dtype", [
    (8, "fake", "float32", jnp.float32), (4, "int", "bfloat16", jnp.float32), (8, "int", "float32", jnp.bfloat16),
    (4, "fake", "bfloat16", jnp.bfloat16)])
def test_served_embedding_rows_equal_the_one_hot_matmul_bit_for_bit(bits, numerics, scale_dtype, dtype):
    cfg = ModelConfig(vocab_size=300, seq_len=8, n_layers=1, n_heads=2, d_model=32, tie_embeddings=False)
    _, variables = init(cfg)
    quant = QuantConfig(mode="serve", weight_bits=8, embed_bits=bits, numerics=numerics, scale_dtype=scale_dtype)
    served = convert(cfg, quant, variables["params"])
    chex.assert_shape(served["aqt"]["embed"]["dot_general"]["aqt"]["qrhs"]["value"], (300, 32))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 300)
    provider = make_matmul(cfg, quant)

    def embedded(matmul):
        apply = functools.partial(Transformer(cfg, dtype=dtype, matmul=matmul).apply,
                                  capture_intermediates=lambda module, _: module.name == "embed")
        logits, state = jax.jit(apply)(served, tokens)
        return logits[0], state["intermediates"]["embed"]["__call__"][0]

    (rows_logits, rows), (matmul_logits, matmul) = embedded(provider), embedded(OneHotEmbedding(provider))
    chex.assert_shape(rows, (2, 8, 32))
    assert rows.dtype == dtype
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(matmul, np.float32))
    np.testing.assert_allclose(rows_logits, matmul_logits, atol=1e-6 if dtype == jnp.float32 else 2e-2)
