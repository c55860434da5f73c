"""A quantized Linear against a plain jnp reference: abs-max scales, integer matmul, dequantize."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant.plan import LayerPlan
from quant.provider import AqtProvider, activation_dot_general
from slm_jax.layers import Linear


def inputs():
    """x: [2, 8, 64] activations and w: [64, 48] weights, made on the host (eager jax ops each compile)."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 8, 64)).astype(np.float32), (0.05 * rng.normal(size=(64, 48))).astype(np.float32)


def quantize(x, bits, axis):
    """Symmetric abs-max quantization along `axis` -> (int32 values, scale). AQT's convention: the abs-max sits on
    the edge of the last bucket (2^(bits-1) - 0.5 steps), values clip to +-(2^(bits-1) - 1), ties round to even."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / (2 ** (bits - 1) - 0.5)
    top = 2 ** (bits - 1) - 1
    return jnp.clip(jnp.round(x / scale), -top, top).astype(jnp.int32), scale


def reference_linear(x, w, weight_bits, act_bits, group_size=None):
    """x: [batch, seq, in] @ w: [in, out]. Weights get one scale per output channel and group of the contracting axis;
    activations (when quantized) one per token and group. Integer matmul per group, then dequantize and sum."""
    batch, seq, fan_in = x.shape
    group = group_size or fan_in
    xg = x.reshape(batch, seq, fan_in // group, group)
    qw, sw = quantize(w.reshape(fan_in // group, group, -1), weight_bits, axis=1)  # sw: [groups, 1, out]
    sw = sw[:, 0][None, None]  # [1, 1, groups, out]
    if act_bits is None:
        partial = jnp.einsum("bsgi,gio->bsgo", xg, qw.astype(jnp.float32))
        return (partial * sw).sum(2)
    qx, sx = quantize(xg, act_bits, axis=-1)  # sx: [batch, seq, groups, 1]
    partial = jnp.einsum("bsgi,gio->bsgo", qx, qw, preferred_element_type=jnp.int32)
    return (partial.astype(jnp.float32) * sx * sw).sum(2)


@pytest.mark.parametrize("weight_bits, act_bits, group_size, numerics", [
    (8, None, None, "int"), (8, None, 16, "fake"), (4, None, None, "fake"), (4, None, 16, "int"),
    (8, 8, None, "int"), (8, 8, 16, "fake"), (4, 8, None, "fake"), (4, 8, 16, "int"),
])
def test_quantized_linear_matches_a_jnp_reference(weight_bits, act_bits, group_size, numerics):
    """Weight-only and weights+activations, per channel and per group of 16, int and fake numerics alike."""
    granularity = "per_channel" if group_size is None else "per_group"
    plan = LayerPlan(weight_bits, act_bits, granularity, group_size, None)
    layer = Linear(48, ("embed", "mlp"), matmul=AqtProvider({(): plan}, QuantMode.TRAIN, numerics))
    x, w = inputs()
    y = jax.jit(layer.apply)({"params": {"kernel": w}}, x)
    ref = jax.jit(reference_linear, static_argnums=(2, 3, 4))(x, w, weight_bits, act_bits, group_size)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x @ w).max() > 1e-4  # and it is really quantized


@pytest.mark.parametrize("weight_bits, dtype", [(8, jnp.int8), (4, jnp.int4)])
@pytest.mark.parametrize("granularity, group_size", [("per_channel", None), ("per_group", 16)])
def test_converted_weights_are_the_reference_integers_and_scales(weight_bits, dtype, granularity, group_size):
    plan = LayerPlan(weight_bits, None, granularity, group_size, None)
    layer = Linear(48, ("embed", "mlp"), matmul=AqtProvider({(): plan}, QuantMode.CONVERT, "int"))
    x, w = inputs()
    _, written = jax.jit(lambda v, x: layer.apply(v, x, mutable=["aqt"]))({"params": {"kernel": w}}, x)
    frozen = written["aqt"]["dot_general"]["aqt"]["qrhs"]
    groups = 64 // (group_size or 64)
    q, scale = jax.jit(quantize, static_argnums=(1, 2))(w.reshape(groups, -1, 48), weight_bits, 1)  # [groups, 1, out]
    if group_size is None:
        chex.assert_shape([frozen["value"], frozen["scale"]], [(64, 48), (1, 1, 48)])
    else:
        chex.assert_shape([frozen["value"], frozen["scale"]], [(groups, group_size, 48), (groups, 1, 1, 48)])
    chex.assert_type([frozen["value"], frozen["scale"]], [dtype, jnp.float32])
    np.testing.assert_array_equal(np.asarray(frozen["value"]).astype(np.int32).reshape(q.shape), q)
    np.testing.assert_allclose(frozen["scale"].reshape(scale.shape), scale, rtol=1e-6)


def test_quantized_gradients_round_stochastically_with_the_dropout_rng():
    plan = LayerPlan(8, 8, "per_channel", None, bwd_bits=8)
    layer = Linear(48, ("embed", "mlp"), matmul=AqtProvider({(): plan}, QuantMode.TRAIN, "int"))
    x, w = inputs()

    @jax.jit
    def grads(key):  # d/dx and d/dW of a loss through the quantized layer; key None: round to nearest
        rngs = {} if key is None else {"dropout": key}
        loss = lambda x, w: jnp.sum(jnp.sin(layer.apply({"params": {"kernel": w}}, x, rngs=rngs)))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    float_grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1)))(x, w)
    first, second, nearest = grads(jax.random.PRNGKey(0)), grads(jax.random.PRNGKey(1)), grads(None)
    for g, g2, g_nearest, g_float in zip(first, second, nearest, float_grads):
        assert np.isfinite(g).all() and np.abs(g - g2).max() > 0  # the noise follows the key
        for approx in (g, g_nearest):
            assert np.linalg.norm(approx - g_float) / np.linalg.norm(g_float) < 0.05


def test_attention_einsum_with_int_numerics_in_float16_matches_float32():
    """A quantized attention einsum (both operands activations, int8 x int8) on float16 operands of +-1 contracting
    64 elements: the int32 sums reach 1,032,256, past float16's 65,504, while the result (at most 64) is small. The
    float16 result is the float32 computation's, rounded to float16, not inf (AQT's rescale of the int32 sums runs in
    float32, quant.provider.float16_safe)."""
    plan = LayerPlan(8, 8, "per_channel", None, None, "attention")
    dot = activation_dot_general(plan, "int")
    rng = np.random.default_rng(0)
    q = rng.choice([-1.0, 1.0], size=(4, 64)).astype(np.float16)  # codes +-127, int32 sums up to 127 * 127 * 64
    k = rng.choice([-1.0, 1.0], size=(64, 4)).astype(np.float16)
    dims = (((1,), (0,)), ((), ()))
    half = np.asarray(dot(jnp.asarray(q), jnp.asarray(k), dims))
    full = np.asarray(dot(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), dims))
    assert half.dtype == np.float16 and np.isfinite(half).all()
    np.testing.assert_array_equal(half, full.astype(np.float16))
    # AQT puts the abs-max 1 at 127.5 steps and clips to 127: each operand reads 127 / 127.5 of its value
    np.testing.assert_allclose(full, (127 / 127.5) ** 2 * (q.astype(np.float64) @ k.astype(np.float64)), rtol=1e-6)
