"""AWQ and SmoothQuant: folded scales leave the float model's function unchanged; the scales they choose lower the
quantization error where activations have outlier channels."""
import argparse

import numpy as np

from quant import grid
from quant.awq import AWQSettings, apply_awq, group_error, search_clip, search_scales
from quant.calibrate import InputStats, collect_input_stats
from quant.config import QuantConfig
from quant.convert import add_method_args, method_from_args
from quant.folding import InputGroup, fold_scales, input_groups
from quant.plan import LayerPlan, make_plan
from quant.smoothquant import apply_smoothquant, smoothing_scales
from tests.ptq_models import TINY, float_logits, random_params, random_tokens


def outlier_inputs(seed=0, tokens=512, fan_in=64, out=32, outliers=4, size=20.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(tokens, fan_in))
    x[:, rng.choice(fan_in, outliers, replace=False)] *= size
    return x, rng.normal(0, 0.1, (fan_in, out))


def stats_of(x):
    return InputStats(x.T @ x, np.abs(x).sum(0), np.abs(x).max(0), len(x))


def test_every_fold_keeps_the_float_logits():
    """Random scales folded at every point (norms into q/k/v and gate/up, v into o under GQA, up into down,
    final norm into the LM head) change the logits by less than 1e-5."""
    params, tokens = random_params(), random_tokens(3)
    groups = input_groups(TINY)
    assert [len(g.layers) for g in groups] == [3, 1, 2, 1] * 2 + [1]
    rng = np.random.default_rng(0)
    folded = params
    for group in groups:
        folded = fold_scales(folded, group, np.exp(rng.normal(0, 1, group.channels)))
    ref = float_logits(params, tokens)
    np.testing.assert_allclose(float_logits(folded, tokens), ref, atol=1e-5, rtol=1e-5)
    assert np.abs(ref).max() > 1  # logits of a size where 1e-5 means something
    assert not np.allclose(folded["layer_0"]["attn"]["v"]["kernel"], params["layer_0"]["attn"]["v"]["kernel"])


def test_gqa_o_projection_shares_its_kv_heads_scales():
    o = input_groups(TINY)[1]
    assert o.channels == TINY.kv_heads * TINY.head_dim == 16 and len(o.expand) == TINY.n_heads * TINY.head_dim
    np.testing.assert_array_equal(o.expand[:8], np.arange(8))  # query heads 0 and 1 read kv head 0
    np.testing.assert_array_equal(o.expand[8:16], np.arange(8))
    np.testing.assert_array_equal(o.expand[16:24], np.arange(8, 16))


def test_awq_lowers_the_output_error_on_outlier_channels():
    x, w = outlier_inputs()
    group = InputGroup((("l",),), ("norm", "scale"), np.arange(64))
    plan = LayerPlan(3, None, "per_channel", None, None)
    scales, alpha, ratio = search_scales([w], [plan], stats_of(x), group)
    assert alpha > 0 and ratio < 0.8
    codes, rtn_scales = grid.rtn(w, 3)
    rtn_error = np.sum((x @ w - x @ grid.dequantize(codes, rtn_scales)) ** 2)  # by hand, not from X^T X
    np.testing.assert_allclose(group_error([w], [plan], x.T @ x, np.ones(64)), rtn_error, rtol=1e-6)
    codes, awq_scales = grid.rtn((w * scales[:, None]).astype(np.float32), 3)
    awq_error = np.sum((x @ w - (x / scales) @ grid.dequantize(codes, awq_scales)) ** 2)
    np.testing.assert_allclose(awq_error / rtn_error, ratio, rtol=1e-4)


def w8a8_error(x, w):
    """||x w - Q(x) Q(w)|| with per-token int8 activations and per-channel int8 weights (AQT's abs-max grid)."""
    xq = grid.dequantize(*grid.rtn(x.T.astype(np.float32), 8)).T
    return np.linalg.norm(x @ w - xq @ grid.dequantize(*grid.rtn(w.astype(np.float32), 8)))


def test_smoothquant_lowers_the_w8a8_error_on_activation_outliers():
    x, w = outlier_inputs(outliers=2, size=100.0)
    group = InputGroup((("l",),), ("norm", "scale"), np.arange(64))
    s = smoothing_scales([w], stats_of(x), group, alpha=0.5)
    np.testing.assert_allclose(s, np.sqrt(np.abs(x).max(0)) / np.sqrt(np.abs(w).max(1)))
    assert w8a8_error(x / s, w * s[:, None]) < 0.5 * w8a8_error(x, w)


def test_awq_and_smoothquant_on_a_model_keep_its_float_logits():
    params, tokens = random_params(), random_tokens(8)
    firsts = [g.layers[0] for g in input_groups(TINY)]
    stats = collect_input_stats(TINY, QuantConfig(), {"params": params}, tokens, firsts)
    ref = float_logits(params, tokens)
    awq_plan = make_plan(TINY, QuantConfig(mode="serve", weight_bits=3, granularity="per_group", group_size=16))
    awq_params, chosen = apply_awq(TINY, awq_plan, params, stats, AWQSettings(clip=False))
    assert set(chosen) == {"/".join(p) for p in firsts}
    assert all(c["error_vs_rtn"] <= 1 and "clip_ratio_mean" not in c for c in chosen.values())
    np.testing.assert_allclose(float_logits(awq_params, tokens), ref, atol=1e-5, rtol=1e-5)
    clipped, chosen_clip = apply_awq(TINY, awq_plan, params, stats)  # the same scales, then clamped kernels
    assert [c["scales"] for c in chosen_clip.values()] == [c["scales"] for c in chosen.values()]
    for name in ("q", "k", "v"):
        before, after = awq_params["layer_0"]["attn"][name]["kernel"], clipped["layer_0"]["attn"][name]["kernel"]
        if name in ("q", "k"):  # not clipped, as in the paper
            np.testing.assert_array_equal(after, before)
        else:
            assert np.all(np.abs(after) <= np.abs(before)) and np.all(after * before >= 0)
    assert all(0.5 < c["clip_ratio_mean"] <= 1 for c in chosen_clip.values())
    sq_plan = make_plan(TINY, QuantConfig(mode="serve", weight_bits=8, act_bits=8))
    sq_params, chosen = apply_smoothquant(TINY, sq_plan, params, stats, alpha=0.5)
    assert all(c["act_max_after"] < c["act_max_before"] for c in chosen.values())
    np.testing.assert_allclose(float_logits(sq_params, tokens), ref, atol=1e-5, rtol=1e-5)


def clip_errors(x, w, kernel, bits, group_size):
    """Per (group, output channel): sum over tokens of (x_g . (w_g - Q(kernel_g)))^2, from the tokens x."""
    codes, scales = grid.rtn(kernel, bits, group_size)
    delta = w - grid.dequantize(codes, scales)
    groups = w.shape[0] // group_size
    parts = [x[:, g * group_size:(g + 1) * group_size] @ delta[g * group_size:(g + 1) * group_size]
             for g in range(groups)]
    return np.stack([np.sum(p ** 2, axis=0) for p in parts])


def test_awq_clipping_never_raises_the_output_error_and_ratio_one_is_unclipped():
    """INT3 g16 with one large weight per group on an input channel that carries small activations: clamping it
    costs little output and buys finer steps for the other weights of its group."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 64))
    w = rng.normal(0, 0.05, (64, 24)).astype(np.float32)
    quiet = np.arange(0, 64, 16) + rng.integers(0, 16, 4)
    x[:, quiet] *= 0.05
    w[quiet] *= 6
    plan = LayerPlan(3, None, "per_group", 16, None)
    clamped, ratios = search_clip(w, plan, x.T @ x, AWQSettings().clip_ratios)
    assert clamped.shape == w.shape and clamped.dtype == np.float32 and ratios.shape == (4, 24)
    unclipped = clip_errors(x, w, w, 3, 16)
    clipped = clip_errors(x, w, clamped, 3, 16)
    assert np.all(clipped <= unclipped * (1 + 1e-9))
    assert clipped.sum() < 0.9 * unclipped.sum() and np.any(ratios < 1)
    bound = np.abs(w).reshape(4, 16, 24).max(axis=1) * ratios.astype(np.float32)  # each group's clamp, float32
    np.testing.assert_array_equal(np.abs(clamped).reshape(4, 16, 24).max(axis=1), bound)
    same, ones = search_clip(w, plan, x.T @ x, [1.0])
    np.testing.assert_array_equal(same, w)
    np.testing.assert_array_equal(ones, 1.0)
    assert AWQSettings().clip_ratios[0] == 1.0 and len(AWQSettings().clip_ratios) == 10


def test_no_awq_clip_turns_the_clipping_search_off():
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    for flags, clip in ((["--method", "awq+gptq"], True), (["--method", "awq", "--no-awq-clip"], False)):
        _, settings = method_from_args(parser.parse_args(flags))
        assert settings.awq.clip is clip and settings.to_json(flags[1])["awq"]["clip"] is clip
