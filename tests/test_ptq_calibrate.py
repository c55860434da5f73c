"""Calibration tokens come from the training split, deterministically; input statistics match plain numpy."""
import jax
import numpy as np
import pytest

from quant.calibrate import calibration_tokens, collect_input_stats
from quant.config import QuantConfig
from quant.serving import convert
from quant.hooks import capture_inputs
from quant.provider import make_matmul
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from tests.ptq_models import TINY, random_params, random_tokens


def test_calibration_windows_are_distinct_deterministic_training_text():
    train = np.arange(1000, dtype=np.uint16)
    tokens = calibration_tokens(train, 12, 50, seed=3)
    assert tokens.shape == (12, 50) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, calibration_tokens(train, 12, 50, seed=3))
    assert not np.array_equal(tokens, calibration_tokens(train, 12, 50, seed=4))
    starts = tokens[:, 0]
    assert np.all(starts % 50 == 0) and len(set(starts)) == 12  # whole, non-overlapping windows
    np.testing.assert_array_equal(tokens, starts[:, None] + np.arange(50))
    assert len(calibration_tokens(train, 20, 50, seed=0)) == 20  # exactly what the split holds


def test_more_calibration_than_the_split_holds_is_a_user_error():
    with pytest.raises(UserError, match="training split holds 1,000"):
        calibration_tokens(np.zeros(1000, np.uint16), 21, 50, seed=0)
    with pytest.raises(UserError, match="positive"):
        calibration_tokens(np.zeros(1000, np.uint16), 0, 50, seed=0)


def test_input_stats_of_the_first_layer_match_numpy():
    """layer_0's q, k and v read RMSNorm(embedding rows): computed here by hand."""
    params, tokens = random_params(), random_tokens(5)
    stats = collect_input_stats(TINY, QuantConfig(), {"params": params}, tokens, [("layer_0", "attn", "q")],
                                chunk=2)[("layer_0", "attn", "q")]
    x = params["embed"]["embedding"][tokens].reshape(-1, TINY.d_model).astype(np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + TINY.norm_eps) * params["layer_0"]["attn_norm"]["scale"]
    assert stats.tokens == 5 * 16
    np.testing.assert_allclose(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.hessian, 2 * x.T @ x / 80, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.mean_abs, np.abs(x).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.abs_max, np.abs(x).max(0), rtol=1e-5)


def test_serving_model_stats_are_the_quantized_models_inputs():
    """On a serving model, a later layer's statistics come from the quantized layers before it, summed over
    chunks exactly as over one batch."""
    quant = QuantConfig(mode="serve", weight_bits=3, granularity="per_group", group_size=16)
    variables = convert(TINY, quant, random_params())
    tokens, down = random_tokens(6), ("layer_1", "mlp", "down")
    stats = collect_input_stats(TINY, quant, variables, tokens, [down], chunk=4)[down]
    model = Transformer(TINY, matmul=make_matmul(TINY, quant, hooks=(capture_inputs(),)))
    captured = jax.jit(lambda v, t: model.apply(v, t, mutable=["quant_inputs"])[1])(variables, tokens)
    x = np.asarray(captured["quant_inputs"]["layer_1"]["mlp"]["down"]["dot_general"]["x"], np.float64)
    x = x.reshape(-1, TINY.hidden)
    np.testing.assert_allclose(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-3)
    float_stats = collect_input_stats(TINY, QuantConfig(), {"params": random_params()}, tokens, [down])[down]
    assert not np.allclose(float_stats.xtx, stats.xtx, rtol=1e-3)
