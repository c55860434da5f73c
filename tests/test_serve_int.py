"""Served `int` layers beyond AQT's forms (quant.serving_int): weight-only layers over hi/lo int8 halves of the
activations, per-group w4a8 as one int8 dot per group. Checked against float64 numpy over the stored integers and
against AQT's own SERVE forward, with the error bounds the module states."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant.plan import LayerPlan
from quant.serving_int import GROUPED_MAX_ROWS, LO_UNITS, split_hi_lo
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


def served_and_stored(plan, dtype, rows, numerics="int"):
    """(served output of `rows` x rows, x, kernel-free variables, stored value and scale as float64)."""
    x = (jax.random.normal(jax.random.PRNGKey(0), (1, rows, 64)) * 3).astype(dtype)
    kernel = (jax.random.normal(jax.random.PRNGKey(1), (64, 48)) * 0.1).astype(dtype)
    _, written = Layer(plan, QuantMode.CONVERT, numerics).apply({}, x, kernel, mutable=["aqt"])
    served = jax.jit(Layer(plan, QuantMode.SERVE, numerics).apply)(written, x, jnp.zeros_like(kernel))
    stored = written["aqt"]["dot_general"]["aqt"]["qrhs"]
    value = np.asarray(stored["value"].astype(jnp.int8), np.float64)
    scale = np.asarray(stored["scale"].astype(jnp.float32), np.float64)
    weight = (value * scale.reshape(value.shape[:-2] + (1, 48))).reshape(64, 48)
    return served, x, written, weight


@pytest.mark.parametrize("plan", [W8, W4G16], ids=["w8", "w4g16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_weight_only_int_is_the_float_matmul_within_the_split_bound(plan, dtype, rows):
    served, x, written, weight = served_and_stored(plan, dtype, rows)
    chex.assert_shape(served, (1, rows, 48))
    assert served.dtype == dtype
    xs = np.asarray(x, np.float64)[0]
    exact = xs @ weight
    # the split's error per element, through |W|; then float32 sums and the output's rounding to dtype
    split = (np.abs(xs).max(axis=1, keepdims=True) / 127 / (2 * LO_UNITS)) @ np.abs(weight).sum(0, keepdims=True)
    ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -8
    magnitude = np.abs(xs) @ np.abs(weight)
    error = np.abs(np.asarray(served, np.float64)[0] - exact)
    assert np.all(error <= split + ulp * np.abs(exact) + 1e-5 * magnitude)
    # and AQT's own SERVE forward (fake: the dequantized weight in dtype, one float matmul) within dtype's rounding
    reference = jax.jit(AqtReference(plan, "fake").apply)({"aqt": written["aqt"]["dot_general"]}, x,
                                                          jnp.zeros((64, 48), dtype))
    ref_error = np.abs(np.asarray(served, np.float64) - np.asarray(reference, np.float64))[0]
    assert np.all(ref_error <= split + 4 * ulp * magnitude)
    hlo = jax.jit(Layer(plan, QuantMode.SERVE, "int").apply).lower(written, x, jnp.zeros((64, 48), dtype)).as_text()
    assert f"tensor<{2 * rows}x{plan.group_size or 64}xi8>" in hlo  # hi over lo: int8 dots of twice the rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_w4a8_per_group_int_is_aqts_integer_serve_forward(dtype, rows):
    served, x, written, _ = served_and_stored(W4A8G16, dtype, rows)
    reference = jax.jit(AqtReference(W4A8G16, "int").apply)({"aqt": written["aqt"]["dot_general"]}, x,
                                                            jnp.zeros((64, 48), dtype))
    chex.assert_equal_shape([served, reference])
    assert served.dtype == reference.dtype
    served, reference = np.asarray(served, np.float64), np.asarray(reference, np.float64)
    # the same integer sums and scales: only the order of the group sum and float32 vs dtype rescaling differ
    ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -7
    assert np.abs(served - reference).max() <= 4 * ulp * np.abs(reference).max()


@pytest.mark.parametrize("plan", [W4G16, W4A8G16], ids=["w4g16", "w4a8g16"])
def test_many_rows_per_group_serve_the_dequantized_matmul(plan):
    """Past GROUPED_MAX_ROWS a per-group layer is served as with fake numerics, bit for bit."""
    rows = GROUPED_MAX_ROWS + 1
    served, *_ = served_and_stored(plan, jnp.bfloat16, rows)
    fake, *_ = served_and_stored(plan, jnp.bfloat16, rows, numerics="fake")
    np.testing.assert_array_equal(np.asarray(served, np.float32), np.asarray(fake, np.float32))
