"""GPTQ against a plain, slow OBS reference; the abs-max grid against AQT's own CONVERT output."""
import jax
import numpy as np
import pytest
from aqt.jax.v2.utils import QuantMode

from quant import grid
from quant.gptq import GPTQSettings, gptq, inverse_hessian_factor
from quant.plan import LayerPlan
from quant.provider import QuantDotGeneral
from slm_jax.errors import UserError


def heavy_tailed(seed: int, tokens: int = 256, fan_in: int = 64, out: int = 24):
    """x: [tokens, in] correlated Student-t activations (16 factors plus noise, as hidden states are) with a few
    large channels, w: [in, out] Gaussian weights."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_t(3, size=(tokens, 16)) @ rng.normal(size=(16, fan_in))
    x = (factors + 0.3 * rng.standard_t(3, size=(tokens, fan_in))) * np.exp(rng.normal(0, 0.7, fan_in))
    x[:, rng.choice(fan_in, 3, replace=False)] *= 8
    w = rng.normal(0, 0.05, (fan_in, out)).astype(np.float32)
    return x, w


def obs_reference(kernel, hessian, bits, group_size, scale_dtype, damp, act_order):
    """Optimal Brain Surgeon one input at a time, with an explicit inverse Hessian that loses each rounded input
    (Frantar & Alistarh's OBQ update, no Cholesky, no lazy batches)."""
    fan_in = kernel.shape[0]
    size = group_size or fan_in
    w = kernel.astype(np.float64)
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(fan_in)
    h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(fan_in))
    codes, scales, left = np.zeros(kernel.shape, np.int8), {}, list(order)
    for r in order:
        g = r // size
        if g not in scales:
            source = kernel if group_size is None else w[g * size:(g + 1) * size]
            scales[g] = grid.abs_max_scale(source, bits, scale_dtype)[0]
        codes[r] = grid.round_to_grid(w[r], scales[g], bits, scale_dtype)
        delta = w[r] - codes[r] * scales[g].astype(np.float64)
        left.remove(r)
        w[left] -= np.outer(h_inv[left, r] / h_inv[r, r], delta)
        h_inv = h_inv - np.outer(h_inv[:, r], h_inv[r, :]) / h_inv[r, r]
    return codes, np.stack([scales[g] for g in range(fan_in // size)])


def objective(x, w, codes, scales):
    return np.linalg.norm(x @ w - x @ grid.dequantize(codes, scales))


@pytest.mark.parametrize("bits, group_size, act_order, scale_dtype", [
    (4, None, False, "float32"), (3, 16, False, "float32"), (4, 16, True, "bfloat16"), (8, 8, True, "float32"),
])
def test_gptq_codes_equal_the_one_input_at_a_time_obs_reference(bits, group_size, act_order, scale_dtype):
    """Lazy batches of 16 rows (groups of 8 and 16 inside them) give exactly the reference's codes and scales."""
    x, w = heavy_tailed(0)
    hessian = 2 * x.T @ x
    settings = GPTQSettings(damp=0.01, block_size=16, act_order=act_order)
    codes, scales = gptq(w, hessian, bits, group_size, scale_dtype, settings)
    ref_codes, ref_scales = obs_reference(w, hessian, bits, group_size, scale_dtype, 0.01, act_order)
    assert codes.shape == w.shape and codes.dtype == np.int8
    assert scales.shape == ((64 // group_size) if group_size else 1, 24)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(codes, ref_codes)
    assert np.abs(codes).max() <= grid.max_code(bits)


def test_block_size_changes_nothing():
    x, w = heavy_tailed(1)
    runs = [gptq(w, 2 * x.T @ x, 4, 16, settings=GPTQSettings(block_size=b, act_order=True)) for b in (5, 16, 128)]
    for codes, scales in runs[1:]:
        np.testing.assert_array_equal(codes, runs[0][0])
        np.testing.assert_array_equal(scales, runs[0][1])


@pytest.mark.parametrize("group_size, act_order", [(None, False), (None, True), (16, False), (16, True)])
def test_gptq_objective_is_lower_than_round_to_nearest(group_size, act_order):
    for seed in range(3):
        x, w = heavy_tailed(seed)
        codes, scales = gptq(w, 2 * x.T @ x, 3, group_size, settings=GPTQSettings(act_order=act_order))
        rtn_codes, rtn_scales = grid.rtn(w, 3, group_size)
        assert objective(x, w, codes, scales) < 0.5 * objective(x, w, rtn_codes, rtn_scales)


def test_gptq_on_a_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs: no rounding error can be compensated, so GPTQ is RTN, also for unseen inputs."""
    _, w = heavy_tailed(2)
    diagonal = np.diag(np.random.default_rng(0).uniform(0.5, 3, 64))
    diagonal[5, 5] = 0  # an input calibration never saw
    for group_size in (None, 16):
        codes, scales = gptq(w, diagonal, 4, group_size, settings=GPTQSettings(act_order=True))
        rtn_codes, rtn_scales = grid.rtn(w, 4, group_size)
        np.testing.assert_array_equal(codes, rtn_codes)
        np.testing.assert_array_equal(scales, rtn_scales)


def test_a_singular_hessian_is_one_line_naming_the_layer_the_cause_and_the_flags_that_fix_it():
    x, w = heavy_tailed(0, tokens=8)  # rank 8 < 64 inputs
    with pytest.raises(UserError) as undamped:
        gptq(w, 2 * x.T @ x, 4, settings=GPTQSettings(damp=0.0), name="layer_0/attn/q")
    assert str(undamped.value) == (
        "GPTQ with --damp 0 cannot invert the Hessian of layer_0/attn/q: its calibration inputs span fewer than its "
        "64 input directions (too few distinct tokens, or inputs that depend on each other); use a positive --damp "
        "(default 0.01) or more --calib-batches")
    gptq(w, 2 * x.T @ x, 4, settings=GPTQSettings(damp=0.01))  # damping makes it definite
    with pytest.raises(UserError) as too_small:  # a damping below the Hessian's rounding noise
        inverse_hessian_factor(2 * x.T @ x - 1e-9 * np.eye(64), 1e-14, "layer_1/mlp/down")
    assert str(too_small.value) == (
        "GPTQ cannot invert the Hessian of layer_1/mlp/down even with --damp 1e-14: its calibration inputs span fewer "
        "than its 64 input directions and this damping is too small to make up for it; use a larger --damp "
        "(default 0.01)")
    with pytest.raises(UserError, match="^GPTQ: the input Hessian of layer is not finite"):
        gptq(w, np.full((64, 64), np.nan), 4)


@pytest.mark.parametrize("bits, group_size, scale_dtype", [
    (8, None, "float32"), (4, None, "bfloat16"), (4, 16, "float32"), (3, 8, "bfloat16"),
])
def test_round_to_nearest_is_aqts_convert_bit_for_bit(bits, group_size, scale_dtype):
    _, w = heavy_tailed(3)
    plan = LayerPlan(bits, None, "per_group" if group_size else "per_channel", group_size, None,
                     scale_dtype=scale_dtype)
    x = np.zeros((1, 2, 64), np.float32)
    dot = QuantDotGeneral(("t",), plan, QuantMode.CONVERT, "fake")
    _, written = jax.jit(lambda x, w: dot.apply({}, x, w, (((2,), (0,)), ((), ())), mutable=["aqt"]))(x, w)
    stored = written["aqt"]["aqt"]["qrhs"]
    codes, scales = grid.rtn(w, bits, group_size, scale_dtype)
    np.testing.assert_array_equal(np.asarray(stored["value"]).astype(np.int8).reshape(64, 24), codes)
    np.testing.assert_array_equal(np.asarray(stored["scale"], np.float32).reshape(scales.shape), scales)


@pytest.mark.parametrize("damp", [-0.01, float("nan"), 1e308])
def test_damping_outside_its_range_is_one_user_error(damp):
    with pytest.raises(UserError, match=r"GPTQ damping must be in \[0, 1e\+06\]"):
        GPTQSettings(damp=damp)
