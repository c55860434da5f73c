"""quant.report on serving runs made by calibrated methods: it reports the integers and scales the run stores (not
a round-to-nearest of its parent), and its per-layer KL column is the KL of the model with only that layer quantized."""
import dataclasses
import re

import chex
import jax
import numpy as np
import pytest

from quant.config import QuantConfig, QuantRule
from quant.layer_report import layer_report
from quant.provider import make_matmul
from quant.ptq_methods import PTQSettings, quantize_with_method
from quant.report import folded_input_scales, folded_output_scales
from quant.serving import quantized_weights
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from tests.ptq_models import TINY, float_logits, random_params, random_tokens

INT3_G16 = QuantConfig(mode="qat", weight_bits=3, granularity="per_group", group_size=16, numerics="fake")
SERVE = dataclasses.replace(INT3_G16, mode="serve")


def numpy_kernel(stored):
    """The float kernel [in, out] of stored AQT per-group integers value [groups, size, out], scale [groups, 1, 1,
    out], by hand."""
    value = np.asarray(stored["value"]).astype(np.float64)
    scale = np.asarray(stored["scale"]).astype(np.float64).reshape(value.shape[0], 1, value.shape[-1])
    return (value * scale).reshape(-1, value.shape[-1])


def kernel_of(params, layer):
    node = params
    for key in layer.split("/") + ["kernel"]:
        node = node[key]
    return np.asarray(node, np.float64)


def rel_err(ref, approx):
    return np.linalg.norm(ref - approx) / np.linalg.norm(ref)


@pytest.fixture(scope="module")
def params():
    return random_params()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_report_of_a_serving_run_measures_its_stored_integers(params, method):
    variables, record = quantize_with_method(TINY, SERVE, params, method, random_tokens(8), PTQSettings(chunk=4))
    stored = quantized_weights(variables["aqt"])
    fold, fold_out = folded_input_scales(TINY, record), folded_output_scales(TINY, record)
    assert (fold is None) == (fold_out is None) == (method == "gptq")
    if fold_out is not None:  # AWQ divides v's and up's output columns by the scales of o's and down's inputs
        assert {"/".join(p) for p in fold_out} == {f"layer_{i}/{m}" for i in range(TINY.n_layers)
                                                   for m in ("attn/v", "mlp/up")}
    tokens = random_tokens(2, seed=5)
    rows = layer_report(TINY, INT3_G16, params, tokens, stored, fold, fold_out=fold_out)
    rtn_rows = layer_report(TINY, INT3_G16, params, tokens)
    assert [r.layer for r in rows] == [r.layer for r in rtn_rows] and {r.layer for r in rows} == {
        "/".join(p) for p in stored}
    for row, rtn_row in zip(rows, rtn_rows):
        path = tuple(row.layer.split("/"))
        kernel = kernel_of(params, row.layer)
        s = np.ones(kernel.shape[0]) if fold is None else fold[path]
        o = np.ones(kernel.shape[1]) if fold_out is None or path not in fold_out else fold_out[path]
        expected = rel_err(kernel, numpy_kernel(stored[path]) / s[:, None] * o[None, :])
        assert expected < 2 * rtn_row.weight_rel_err  # the stored integers stand for the parent's weights
        np.testing.assert_allclose(row.weight_rel_err, expected, rtol=1e-5)
        np.testing.assert_allclose(row.scale_max, np.asarray(stored[path]["scale"], np.float64).max(), rtol=1e-7)
        assert abs(row.weight_rel_err - rtn_row.weight_rel_err) > 1e-4 * rtn_row.weight_rel_err


def test_report_of_an_rtn_serving_run_equals_the_requantized_parent(params):
    variables, _ = quantize_with_method(TINY, SERVE, params, "rtn")
    tokens = random_tokens(2, seed=5)
    stored = layer_report(TINY, INT3_G16, params, tokens, quantized_weights(variables["aqt"]))
    for row, ref in zip(stored, layer_report(TINY, INT3_G16, params, tokens)):
        assert (row.layer, row.scale_min, row.scale_max, row.clipped) == (ref.layer, ref.scale_min, ref.scale_max,
                                                                          ref.clipped)
        np.testing.assert_allclose([row.weight_rel_err, row.output_rel_err], [ref.weight_rel_err, ref.output_rel_err],
                                   rtol=1e-5)


def numpy_kl(ref_logits, logits):
    """Mean over tokens of KL(softmax(ref) || softmax(logits)), by hand in float64."""
    p = np.exp(ref_logits - ref_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return float(np.mean(np.sum(p * np.log(p / q), axis=-1)))


def test_per_layer_kl_is_the_kl_of_the_model_with_only_that_layer_quantized(params):
    """The reference runs AQT's own fake quantization of one layer (a rule leaves every other layer float)."""
    kl_tokens, tokens = random_tokens(3, seed=9), random_tokens(2, seed=5)
    rows = {r.layer: r for r in layer_report(TINY, INT3_G16, params, tokens, kl_tokens=kl_tokens)}
    ref = float_logits(params, kl_tokens).astype(np.float64)
    chex.assert_shape(ref, (3, TINY.seq_len, TINY.vocab_size))
    for layer in ("layer_0/attn/v", "layer_1/mlp/down"):
        only = dataclasses.replace(INT3_G16, rules=(QuantRule(match=f"^(?!{re.escape(layer)}$)", weight_bits=None),))
        model = Transformer(TINY, matmul=make_matmul(TINY, only))
        logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, kl_tokens), np.float64)
        chex.assert_equal_shape([ref, logits])
        expected = numpy_kl(ref, logits)
        assert expected > 1e-5
        np.testing.assert_allclose(rows[layer].kl_mean, expected, rtol=2e-3)
    assert all(r.kl_mean >= 0 for r in rows.values())


def test_fold_scales_come_from_the_record_and_an_old_folding_run_is_a_user_error():
    assert folded_input_scales(TINY, {"method": "gptq", "layers": {}}) is None
    scales = list(np.linspace(0.5, 2, 16))  # o's input group: kv_heads * head_dim = 16 scales, expanded to 32
    fold = folded_input_scales(TINY, {"method": "awq", "groups": {"layer_0/attn/o": {"alpha": 0.5, "scales": scales}}})
    assert list(fold) == [("layer_0", "attn", "o")]
    np.testing.assert_array_equal(fold[("layer_0", "attn", "o")], np.concatenate([scales[:8], scales[:8],
                                                                                   scales[8:], scales[8:]]))
    with pytest.raises(UserError, match="does not record the scales it folded"):
        folded_input_scales(TINY, {"method": "smoothquant", "groups": {"layer_0/attn/q": {"act_max_before": 3.0}}})


def test_output_columns_divided_by_the_next_layers_scales_are_multiplied_back(params):
    """v's output columns divided by o in [0.25, 4] (as AWQ's v -> o fold does), then quantized: with fold_out the
    report measures the weights those integers stand for (an error like RTN's on the parent); without it, it would
    compare them with the unscaled kernel and report an error of order 1."""
    path = ("layer_0", "attn", "v")
    o = np.random.default_rng(3).uniform(0.25, 4.0, kernel_of(params, "layer_0/attn/v").shape[1])
    folded = jax.tree_util.tree_map(lambda x: x, params)
    folded["layer_0"]["attn"]["v"]["kernel"] = params["layer_0"]["attn"]["v"]["kernel"] / o[None, :].astype(np.float32)
    stored = quantized_weights(quantize_with_method(TINY, SERVE, folded, "rtn")[0]["aqt"])
    tokens = random_tokens(2, seed=5)
    row = lambda rows: next(r for r in rows if r.layer == "layer_0/attn/v")
    with_fold = row(layer_report(TINY, INT3_G16, params, tokens, stored, fold_out={path: o}))
    without = row(layer_report(TINY, INT3_G16, params, tokens, stored))
    rtn = row(layer_report(TINY, INT3_G16, params, tokens))
    expected = rel_err(kernel_of(params, "layer_0/attn/v"), numpy_kernel(stored[path]) * o[None, :])
    np.testing.assert_allclose(with_fold.weight_rel_err, expected, rtol=1e-5)
    assert with_fold.weight_rel_err < 2 * rtn.weight_rel_err and without.weight_rel_err > 0.5
