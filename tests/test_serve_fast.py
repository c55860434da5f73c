"""The served `fake` forward (one float matmul over the dequantized weight, activations fake-quantized per token)
computes what AQT's own SERVE dot_general computes from the same stored integers and scales: bit for bit per
channel, the same sum in another order per group."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant.plan import LayerPlan
from quant.provider import QuantDotGeneral, aqt_dot_general_config, aqt_module

DIMS = (((2,), (0,)), ((), ()))


class Layer(nn.Module):
    """x @ kernel through one layer's QuantDotGeneral (the kernel is ignored once served)."""

    plan: LayerPlan
    quant_mode: QuantMode
    numerics: str = "fake"

    @nn.compact
    def __call__(self, x, kernel):
        return QuantDotGeneral(("layer",), self.plan, self.quant_mode, self.numerics, name="dot_general")(
            x, kernel, DIMS)


class AqtReference(nn.Module):
    """AQT's AqtDotGeneral in SERVE mode alone, under the same variable names."""

    plan: LayerPlan
    numerics: str = "fake"

    @nn.compact
    def __call__(self, x, kernel):
        cfg = aqt_dot_general_config(self.plan, self.numerics)
        return aqt_module(self.plan, cfg, QuantMode.SERVE)(x, kernel, DIMS, None)


@pytest.mark.parametrize("plan", [
    LayerPlan(weight_bits=8, act_bits=8, granularity="per_channel", group_size=None, bwd_bits=None),
    LayerPlan(weight_bits=8, act_bits=None, granularity="per_channel", group_size=None, bwd_bits=None),
    LayerPlan(weight_bits=4, act_bits=None, granularity="per_group", group_size=16, bwd_bits=None,
              scale_dtype="bfloat16"),
    LayerPlan(weight_bits=4, act_bits=8, granularity="per_group", group_size=16, bwd_bits=None),
], ids=["w8a8", "w8", "w4g16-bf16-scales", "w4a8g16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_served_fake_forward_is_aqts_serve_forward(plan, dtype):
    x = (jax.random.normal(jax.random.PRNGKey(0), (2, 5, 64)) * 3).astype(dtype)
    kernel = (jax.random.normal(jax.random.PRNGKey(1), (64, 48)) * 0.1).astype(dtype)
    _, written = Layer(plan, QuantMode.CONVERT).apply({}, x, kernel, mutable=["aqt"])
    zeros = jnp.zeros_like(kernel)  # the served layer never reads its kernel
    served = jax.jit(Layer(plan, QuantMode.SERVE).apply)(written, x, zeros)
    reference = jax.jit(AqtReference(plan).apply)({"aqt": written["aqt"]["dot_general"]}, x, zeros)
    assert served.dtype == reference.dtype
    served, reference = np.asarray(served, np.float32), np.asarray(reference, np.float32)
    if plan.group_size is None:  # the same matmul
        np.testing.assert_array_equal(served, reference)
    else:  # AQT adds per-group partial products, rounded to the output dtype: the same sum in another order
        ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -7
        assert np.abs(served - reference).max() <= 4 * ulp * np.abs(reference).max()
    float_out = np.asarray(x, np.float32) @ np.asarray(kernel, np.float32)
    assert np.abs(served - float_out).max() < 0.1 * np.abs(float_out).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_served_int_matvec_is_aqts_serve_forward(dtype):
    """One row (decoding one sequence) is served with a zero row appended (two_rows): the first row is bit for bit
    AQT's integer SERVE forward on the single row, and the compiled matmul sees two rows. (Per-group layers: see
    tests/test_serve_int.py.)"""
    plan = LayerPlan(weight_bits=8, act_bits=8, granularity="per_channel", group_size=None, bwd_bits=None)
    x = (jax.random.normal(jax.random.PRNGKey(2), (1, 1, 64)) * 3).astype(dtype)
    kernel = (jax.random.normal(jax.random.PRNGKey(3), (64, 48)) * 0.1).astype(dtype)
    _, written = Layer(plan, QuantMode.CONVERT, "int").apply({}, x, kernel, mutable=["aqt"])
    zeros = jnp.zeros_like(kernel)
    served_fn = jax.jit(Layer(plan, QuantMode.SERVE, "int").apply)
    served = served_fn(written, x, zeros)
    reference = jax.jit(AqtReference(plan, "int").apply)({"aqt": written["aqt"]["dot_general"]}, x, zeros)
    chex.assert_shape(served, (1, 1, 48))
    assert served.dtype == reference.dtype
    np.testing.assert_array_equal(np.asarray(served, np.float32), np.asarray(reference, np.float32))
    hlo = served_fn.lower(written, x, zeros).as_text()
    assert "tensor<2x1x64xi8>" in hlo  # the integer matmul's lhs has two rows
