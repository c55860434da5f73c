"""Served per-group weight-only layers with `int` numerics on CPU (quant.serving_group): the exact INT4 codes in one
int8 dot batched over groups, checked against float64 numpy over the stored integers within the hi/lo split's bound,
against AQT's SERVE forward and the `fake` served model, and which path the compiled layer runs for few and many
rows."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant.plan import LayerPlan
from quant.serving_group import GROUP_DOT_MAX_ROWS, served_group_matmul, sum_groups, uses_group_path
from quant.serving_int import LO_UNITS
from slm_jax.attention import KVCache
from tests.test_serve_fast import AqtReference, Layer
from slm_jax.sampling import generate
from tests.test_serve_speed import SIZE
from train.bench.serve_speed import decode_speed, random_served
from train.build import build_model
from train.config import load_config

W4G16 = LayerPlan(weight_bits=4, act_bits=None, granularity="per_group", group_size=16, bwd_bits=None,
                  scale_dtype="bfloat16")


def split_bound(x: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """The hi/lo split's bound on |served - x @ W| [rows, n]: per (row, group) abs-max / (127 * 2 * LO_UNITS) per
    element of x, through the |W| rows of its group."""
    rows, k = x.shape
    amax = np.abs(x.reshape(rows, k // group, group)).max(-1)  # [rows, groups]
    per_group = np.abs(weight).reshape(k // group, group, -1).sum(1)  # [groups, n]
    return amax / (127 * 2 * LO_UNITS) @ per_group


@pytest.mark.parametrize("codes", [jnp.int8, jnp.int4])
@pytest.mark.parametrize("rows", [1, 3])
def test_group_matmul_is_the_float64_matmul_within_the_split_bound(codes, rows):
    rng = np.random.default_rng(0)
    groups, size, n = 5, 32, 24
    value = rng.integers(-7, 8, (groups, size, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (groups, 1, 1, n)).astype(np.float32)
    # per-group magnitudes far apart, and one all-zero (row, group) slice: each slice gets its own scale
    x = rng.normal(size=(rows, groups, size)) * np.array([1.0, 1e-3, 30.0, 0.5, 2.0])[:, None]
    x[0, 1] = 0.0
    x = x.reshape(1, rows, groups * size).astype(np.float32)
    stored = {"value": jnp.asarray(value).astype(codes), "scale": jnp.asarray(scale)}
    out = jax.jit(served_group_matmul)(stored, jnp.asarray(x))
    chex.assert_shape(out, (1, rows, n))
    assert out.dtype == jnp.float32
    weight = (value.astype(np.float64) * scale.reshape(groups, 1, n)).reshape(groups * size, n)
    xs = x[0].astype(np.float64)
    exact = xs @ weight
    error = np.abs(np.asarray(out, np.float64)[0] - exact)
    float32_sums = 8 * np.finfo(np.float32).eps * (np.abs(xs) @ np.abs(weight))
    assert np.all(error <= split_bound(xs, weight, size) + float32_sums)
    assert error.max() > 0  # the split's error is real, not a float copy of the weights


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 43])
def test_sum_groups_is_the_sum_over_the_first_axis(count):
    p = np.random.default_rng(count).normal(size=(count, 2, 7)).astype(np.float32)
    out = sum_groups(jnp.asarray(p))
    chex.assert_shape(out, (2, 7))
    np.testing.assert_allclose(np.asarray(out), p.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


def served_layer(rows: int, dtype, numerics: str):
    """(served output, x, AQT's collection, float64 weight) of a W4G16 layer [64 -> 48] converted by AQT."""
    x = (jax.random.normal(jax.random.PRNGKey(0), (1, rows, 64)) * 3).astype(dtype)
    kernel = (jax.random.normal(jax.random.PRNGKey(1), (64, 48)) * 0.1).astype(dtype)
    _, written = Layer(W4G16, QuantMode.CONVERT, numerics).apply({}, x, kernel, mutable=["aqt"])
    stored = written["aqt"]["dot_general"]["aqt"]["qrhs"]
    value = np.asarray(stored["value"].astype(jnp.int8), np.float64)
    weight = (value * np.asarray(stored["scale"].astype(jnp.float32), np.float64).reshape(4, 1, 48)).reshape(64, 48)
    served = jax.jit(Layer(W4G16, QuantMode.SERVE, numerics).apply)
    return served(written, x, jnp.zeros_like(kernel)), x, written, weight


def int8_dot_operands(rows: int, dtype) -> list[str]:
    """The i8 operand shapes of the dots in the lowered served W4G16 layer with `int` numerics."""
    _, x, written, _ = served_layer(rows, dtype, "int")
    text = jax.jit(Layer(W4G16, QuantMode.SERVE, "int").apply).lower(written, x, jnp.zeros((64, 48), dtype)).as_text()
    return [line.split("(")[1].split(")")[0] for line in text.splitlines()
            if "stablehlo.dot_general" in line and "xi8>" in line]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, GROUP_DOT_MAX_ROWS])
def test_served_int_layer_runs_the_group_dot_within_bound_of_aqts_forward(dtype, rows):
    out, x, written, weight = served_layer(rows, dtype, "int")
    chex.assert_shape(out, (1, rows, 48))
    assert out.dtype == dtype
    # the compiled layer's one int8 dot: hi over lo rows, batched over the 4 groups of 16
    assert int8_dot_operands(rows, dtype) == [f"tensor<{2 * rows}x4x16xi8>, tensor<4x16x48xi8>"]
    xs = np.asarray(x, np.float64)[0]
    ulp = np.finfo(np.float32).eps if dtype == jnp.float32 else 2.0 ** -8
    magnitude = np.abs(xs) @ np.abs(weight)
    reference = jax.jit(AqtReference(W4G16, "fake").apply)({"aqt": written["aqt"]["dot_general"]}, x,
                                                           jnp.zeros((64, 48), dtype))
    error = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64))[0]
    assert np.all(error <= split_bound(xs, weight, 16) + 4 * ulp * magnitude)


def test_many_rows_serve_the_dequantized_matmul_bit_for_bit():
    """Past GROUP_DOT_MAX_ROWS (prefill, evaluation) the `int` layer runs no int8 dot: it is the `fake` forward."""
    rows = GROUP_DOT_MAX_ROWS + 1
    assert int8_dot_operands(rows, jnp.bfloat16) == []
    out, *_ = served_layer(rows, jnp.bfloat16, "int")
    fake, *_ = served_layer(rows, jnp.bfloat16, "fake")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(fake, np.float32))


def test_only_weight_only_per_group_aqt_layers_with_few_rows_use_the_group_path():
    per_group = {"value": jnp.zeros((2, 16, 8), jnp.int8)}
    few, many = jnp.zeros((1, GROUP_DOT_MAX_ROWS, 32)), jnp.zeros((1, GROUP_DOT_MAX_ROWS + 1, 32))
    assert uses_group_path(W4G16, per_group, few) and not uses_group_path(W4G16, per_group, many)
    w4a8 = LayerPlan(weight_bits=4, act_bits=8, granularity="per_group", group_size=16, bwd_bits=None)
    assert not uses_group_path(w4a8, per_group, few)
    assert not uses_group_path(W4G16, {"value": jnp.zeros((32, 8), jnp.int8)}, few)  # per channel


@pytest.mark.parametrize("batch", [1, GROUP_DOT_MAX_ROWS, 4])
def test_int_served_model_decodes_the_fake_served_logits_within_bound(batch):
    """The tiny served INT4 model in float32 compute: a decode step's logits with `int` numerics (group path up to
    GROUP_DOT_MAX_ROWS) against the same variables served with `fake` numerics (dequantized matmul)."""
    run = random_served("int4_int_f32", SIZE)
    cfg = run.config.model
    fake = build_model(load_config("ptq_int4", (*SIZE, "train.precision=fp32", "quant.numerics=fake")))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 3)), jnp.int32)
    token = prompt[:, -1:]

    def step(model):
        cache = KVCache.init(cfg, batch, model.dtype)
        _, cache = jax.jit(model.apply)(run.variables, prompt[:, :-1], cache=cache)
        return np.asarray(jax.jit(model.apply)(run.variables, token, cache=cache)[0], np.float64)

    served, reference = step(run.model), step(fake)
    chex.assert_shape(served, (batch, 1, cfg.vocab_size))
    assert np.abs(served - reference).max() <= 1e-3 * np.abs(reference).max()
    assert np.all(served.argmax(-1) == reference.argmax(-1))


@pytest.mark.parametrize("batch", [1, 8])
def test_serve_speed_decodes_the_int4_int_variant_through_the_group_dot_at_batch_1(batch):
    """The bench's `int4_int` variant (exact int4 codes in int8 containers, `int` numerics): generate's decode steps
    run the batched int8 dot at batch 1 (d_model 64 = 2 groups of 32), not at batch 8 (more rows than
    GROUP_DOT_MAX_ROWS), nor the prompt's prefill; decode_speed times both."""
    run = random_served("int4_int", SIZE)
    prompt = jnp.zeros((batch, GROUP_DOT_MAX_ROWS + 1), jnp.int32)
    text = generate.lower(run.model, run.variables, prompt, jax.random.PRNGKey(0), 2, 0.8, 40, None).as_text()
    group_dots = re.findall(r"tensor<(\d+)x2x32xi8>", text)
    assert set(group_dots) == ({"2"} if batch <= GROUP_DOT_MAX_ROWS else set())
    speed = decode_speed(run, batch, 4, 1)
    assert speed["batch"] == batch and speed["prefill_tokens_per_s"] > 0 and speed["generate_s"] > 0
