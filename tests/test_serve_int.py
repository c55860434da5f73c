"""Served layers on CPU beyond AQT's forms (quant.serving_int): weight-only per-channel layers with `int` numerics as
one int8 dot over hi/lo int8 halves of the activations, per-group layers re-quantized to int8 per channel, and
per-group layers served as the dequantized matmul. Checked against float64 numpy over the stored integers and
against AQT's own SERVE forward, within the bounds the module states."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant.plan import LayerPlan
from quant.serving_group import GROUP_DOT_MAX_ROWS
from quant.serving_int import LO_UNITS, requantize_per_channel, split_hi_lo
from tests.test_serve_fast import AqtReference, Layer

W8 = LayerPlan(weight_bits=8, act_bits=None, granularity="per_channel", group_size=None, bwd_bits=None)
W4G16 = LayerPlan(weight_bits=4, act_bits=None, granularity="per_group", group_size=16, bwd_bits=None,
                  scale_dtype="bfloat16")
W4A8G16 = LayerPlan(weight_bits=4, act_bits=8, granularity="per_group", group_size=16, bwd_bits=None,
                    scale_dtype="bfloat16")


def test_split_hi_lo_against_numpy():
    x = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32) * np.array([[1.0], [1e-3], [0.0]])
    q, scale = split_hi_lo(jnp.asarray(x))
    chex.assert_shape(q, (6, 40))
    chex.assert_shape(scale, (3, 1))
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32
    q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    expected_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    expected_scale[2] = 1 / 127  # an all-zero row
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-7)
    assert np.abs(q).max() <= 127
    back = scale * (q[:3] + q[3:] / LO_UNITS)
    assert np.all(np.abs(back - x) <= scale / (2 * LO_UNITS) * (1 + 1e-5))
    np.testing.assert_array_equal(back[2], 0)


def test_requantize_per_channel_against_numpy():
    rng = np.random.default_rng(1)
    value = rng.integers(-7, 8, (3, 16, 5)).astype(np.int8)
    value[:, :, 4] = 0  # an all-zero column
    scale = rng.uniform(0.01, 0.1, (3, 1, 1, 5)).astype(np.float32)
    codes, step = requantize_per_channel(jnp.asarray(value), jnp.asarray(scale))
    chex.assert_shape(codes, (48, 5))
    chex.assert_shape(step, (1, 1, 5))
    assert codes.dtype == np.int8 and step.dtype == np.float32
    weight = (value.astype(np.float64) * scale.astype(np.float64).reshape(3, 1, 5)).reshape(48, 5)
    amax = np.abs(weight).max(axis=0)
    np.testing.assert_allclose(step[0, 0, :4], amax[:4] / 127, rtol=1e-7)
    assert np.abs(codes).max() == 127  # each column's abs-max lands on the grid's end
    np.testing.assert_array_equal(codes[:, 4], 0)
    step = step.reshape(1, 5).astype(np.float64)
    error = np.abs(codes * step - weight)
    assert np.all(error <= step / 2 * (1 + 1e-6))


def served(plan, dtype, rows, numerics="int", layout=None):
    """(served output for `rows` rows, x, variables, the float64 weight the served variables stand for)."""
    x = (jax.random.normal(jax.random.PRNGKey(0), (1, rows, 64)) * 3).astype(dtype)
    kernel = (jax.random.normal(jax.random.PRNGKey(1), (64, 48)) * 0.1).astype(dtype)
    _, written = Layer(plan, QuantMode.CONVERT, numerics).apply({}, x, kernel, mutable=["aqt"])
    stored = written["aqt"]["dot_general"]["aqt"]["qrhs"]
    if layout:
        value, scale = requantize_per_channel(stored["value"].astype(jnp.int8), stored["scale"])
        stored = {"value": jnp.asarray(value), "scale": jnp.asarray(scale)}
        written = {"aqt": {"dot_general": {"aqt": {"qrhs": stored}}}}
    value = np.asarray(stored["value"].astype(jnp.int8), np.float64)
    scale = np.asarray(stored["scale"].astype(jnp.float32), np.float64)
    weight = (value * scale.reshape(value.shape[:-2] + (1, 48))).reshape(64, 48)
    out = jax.jit(Layer(plan, QuantMode.SERVE, numerics).apply)(written, x, jnp.zeros_like(kernel))
    return out, x, written, weight


@pytest.mark.parametrize("plan,layout", [(W8, None), (W4G16, "per_channel")], ids=["w8", "w4g16-per-channel"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_weight_only_int_is_the_float_matmul_within_the_split_bound(plan, layout, dtype, rows):
    out, x, written, weight = served(plan, dtype, rows, layout=layout)
    chex.assert_shape(out, (1, rows, 48))
    assert out.dtype == dtype
    xs = np.asarray(x, np.float64)[0]
    exact = xs @ weight
    # the split's error per element, through |W|; then float32 sums and the output's rounding to dtype
    split = (np.abs(xs).max(axis=1, keepdims=True) / 127 / (2 * LO_UNITS)) @ np.abs(weight).sum(0, keepdims=True)
    ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -8
    magnitude = np.abs(xs) @ np.abs(weight)
    error = np.abs(np.asarray(out, np.float64)[0] - exact)
    assert np.all(error <= split + ulp * np.abs(exact) + 1e-5 * magnitude)
    # AQT's own SERVE forward over the same stored weight (fake: dequantized in dtype, one float matmul)
    reference = jax.jit(AqtReference(W8, "fake").apply)({"aqt": written["aqt"]["dot_general"]}, x,
                                                        jnp.zeros((64, 48), dtype))
    ref_error = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64))[0]
    assert np.all(ref_error <= split + 4 * ulp * magnitude)
    hlo = jax.jit(Layer(plan, QuantMode.SERVE, "int").apply).lower(written, x, jnp.zeros((64, 48), dtype)).as_text()
    assert f"tensor<{2 * rows}x64xi8>" in hlo  # hi over lo: one int8 dot of twice the rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_channel_int8_serves_the_per_group_layer_within_its_bound(dtype):
    """The re-quantized layer's output against AQT's SERVE forward of the original per-group layer: within the
    re-quantization's bound (half a step of each column) plus the split's and dtype's rounding."""
    rows = 3
    out, x, _, requantized = served(W4G16, dtype, rows, layout="per_channel")
    _, _, written, original = served(W4G16, dtype, rows)
    reference = jax.jit(AqtReference(W4G16, "fake").apply)({"aqt": written["aqt"]["dot_general"]}, x,
                                                           jnp.zeros((64, 48), dtype))
    xs = np.asarray(x, np.float64)[0]
    step = np.abs(original).max(axis=0, keepdims=True) / 127
    assert np.all(np.abs(requantized - original) <= step / 2 * (1 + 1e-6))
    bound = np.abs(xs) @ (step / 2 * np.ones_like(original))  # the weights' re-quantization
    ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -8
    magnitude = np.abs(xs) @ np.abs(original)
    error = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64))[0]
    assert np.all(error <= bound + 1e-4 * magnitude + 4 * ulp * magnitude)


@pytest.mark.parametrize("plan,rows", [(W4G16, GROUP_DOT_MAX_ROWS + 1), (W4A8G16, 1), (W4A8G16, 5)],
                         ids=["w4g16-many-rows", "w4a8g16-1", "w4a8g16-5"])
def test_per_group_layers_serve_the_dequantized_matmul_on_cpu(plan, rows):
    """A per-group layer with `int` numerics serves on CPU as with `fake` numerics, bit for bit (AQT's integer form
    of per-group layers is the slowest there): with act_bits, and weight-only past the rows of decoding (fewer rows:
    quant.serving_group, tests/test_serve_group.py)."""
    out, *_ = served(plan, jnp.bfloat16, rows)
    fake, *_ = served(plan, jnp.bfloat16, rows, numerics="fake")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(fake, np.float32))
