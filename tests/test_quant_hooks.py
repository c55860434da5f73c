"""Hooks around the quantized matmuls (statistics into a Flax collection, weight noise) and the error report."""
import flax.linen as nn
import jax
import numpy as np

from quant.config import QuantConfig, QuantRule
from quant.hooks import LayerHook, capture_inputs, record_abs_max
from quant.provider import make_matmul
from quant.layer_report import CLIPPED_LEGEND, KL_LEGEND, format_report, layer_report
from slm_jax import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=256, seq_len=16, n_layers=2, n_heads=4, d_model=64, tie_embeddings=False)
TOKENS = np.random.default_rng(2).integers(0, 256, (2, 16), dtype=np.int32)  # host arrays: eager jax ops compile
INT8 = QuantConfig(weight_bits=8)


def float_params():
    """Gaussian params like the model's init, without compiling it (compiling init costs seconds on CPU)."""
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(CFG).init(jax.random.PRNGKey(0), TOKENS)))["params"]
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.ones(leaf.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
        else rng.normal(scale=0.02, size=leaf.shape).astype(np.float32), shapes)


def test_abs_max_hook_records_matching_layers_into_a_collection_and_keeps_the_running_max():
    hooks = (record_abs_max("mlp/(gate|up)"), capture_inputs("mlp/gate"))
    model = Transformer(CFG, matmul=make_matmul(CFG, INT8, "qat", hooks=hooks))
    apply = jax.jit(lambda v, t: model.apply(v, t, mutable=["quant_stats", "quant_inputs"]))
    params = float_params()
    empty = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                   jax.eval_shape(apply, {"params": params}, TOKENS)[1]["quant_stats"])
    (y, _), state = apply({"params": params, "quant_stats": empty}, TOKENS)
    stats = state["quant_stats"]
    assert sorted(stats) == ["layer_0", "layer_1"] and sorted(stats["layer_0"]["mlp"]) == ["gate", "up"]
    gate = stats["layer_0"]["mlp"]["gate"]["dot_general"]["act_abs_max"]
    np.testing.assert_allclose(gate, np.abs(state["quant_inputs"]["layer_0"]["mlp"]["gate"]["dot_general"]["x"]).max())
    np.testing.assert_allclose(stats["layer_0"]["mlp"]["up"]["dot_general"]["act_abs_max"], gate)  # same input
    np.testing.assert_allclose(y, jax.jit(Transformer(CFG, matmul=make_matmul(CFG, INT8, "qat")).apply)(
        {"params": params}, TOKENS)[0])  # observing changes nothing

    (_, _), again = apply({"params": params, "quant_stats": stats}, np.zeros_like(TOKENS))  # a second batch
    second = np.abs(again["quant_inputs"]["layer_0"]["mlp"]["gate"]["dot_general"]["x"]).max()
    np.testing.assert_allclose(again["quant_stats"]["layer_0"]["mlp"]["gate"]["dot_general"]["act_abs_max"],
                               np.maximum(gate, second))


def test_a_noise_hook_perturbs_only_the_layers_it_matches_even_in_a_float_model():
    seen = []

    def weight_noise(ctx, x, kernel, next_dot):
        seen.append("/".join(ctx.path))
        return next_dot(x, kernel + 0.01 * jax.random.normal(ctx.module.make_rng("noise"), kernel.shape))

    params = float_params()
    noisy = Transformer(CFG, matmul=make_matmul(CFG, QuantConfig(), "none", hooks=(LayerHook("lm_head", weight_noise),)))
    run = jax.jit(lambda key: noisy.apply({"params": params}, TOKENS, rngs={"noise": key})[0])
    clean = jax.jit(Transformer(CFG).apply)({"params": params}, TOKENS)[0]
    first, second, again = run(jax.random.key(0)), run(jax.random.key(1)), run(jax.random.key(0))
    assert seen == ["lm_head"]
    assert np.abs(first - clean).max() > 0 and np.abs(first - second).max() > 0
    np.testing.assert_allclose(again, first)


def test_report_measures_each_quantized_layer_on_float_activations():
    quant_cfg = QuantConfig(weight_bits=8, act_bits=8, rules=(
        QuantRule(match="mlp", weight_bits=4, act_bits=None, granularity="per_group", group_size=16),
        QuantRule(match="lm_head", weight_bits=None)))
    rows = layer_report(CFG, quant_cfg, float_params(), TOKENS)
    assert [r.layer for r in rows][:5] == ["layer_0/attn/q", "layer_0/attn/k", "layer_0/attn/v", "layer_0/attn/o",
                                           "layer_0/mlp/gate"]
    assert len(rows) == 14 and all(r.layer != "lm_head" for r in rows)
    int4, int8 = [r for r in rows if "mlp" in r.layer], [r for r in rows if "attn" in r.layer]
    assert {(r.weight_bits, r.act_bits, r.granularity) for r in int4} == {(4, None, "per_group(16)")}
    assert {(r.weight_bits, r.act_bits, r.granularity) for r in int8} == {(8, 8, "per_channel")}
    for r in int4:  # Gaussian weights: ~20 dB at 4 bits in groups of 16, ~40 dB at 8 bits per channel
        assert 15 < r.weight_sqnr_db < 30 and r.weight_rel_err < 0.2 and r.output_rel_err < 0.2
        assert 0 < r.clipped < 0.15 and 0 < r.scale_min <= r.scale_max
    for r in int8:
        assert 35 < r.weight_sqnr_db and r.weight_rel_err < 0.02 and r.output_rel_err < 0.03
        assert r.clipped <= 0.02  # only values within half a step of each column's abs-max
    table = format_report(rows).splitlines()
    assert table[0].split()[:3] == ["layer", "w", "a"] and len(table) == 2 + len(rows) + 3
    assert table[-3:] == ["", KL_LEGEND, CLIPPED_LEGEND] and table[2].split()[-1] == "-"  # no KL windows given
