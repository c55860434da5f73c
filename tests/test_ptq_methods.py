"""quantize_with_method: every method writes serving variables that serve what it chose; bad input is refused
before any work."""
import dataclasses

import jax
import numpy as np
import pytest

from quant.calibrate import collect_input_stats
from quant.config import QuantConfig, QuantRule
from quant.serving import convert, dequantize, quantized_weights
from quant.gptq import GPTQSettings, gptq
from quant.provider import make_matmul
from quant.ptq_methods import PTQSettings, quantize_with_method
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from tests.ptq_models import TINY, float_logits, random_params, random_tokens

INT3_G16 = QuantConfig(mode="serve", weight_bits=3, granularity="per_group", group_size=16, numerics="fake")


def serve_logits(quant, variables, tokens):
    model = Transformer(TINY, matmul=make_matmul(TINY, quant))
    return np.asarray(jax.jit(lambda v, t: model.apply(v, t)[0])(variables, tokens))


def dequantized_params(params, variables):
    """Float params updated with the serving variables' params (AWQ folds scales into norms) and their quantized
    kernels replaced by what the serving variables store."""
    params = jax.tree_util.tree_map(np.asarray, params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        node = params
        for key in path[:-1]:
            node = node[key.key]
        node[path[-1].key] = np.asarray(leaf)
    for path, stored in quantized_weights(variables["aqt"]).items():
        node = params
        for key in path:
            node = node[key]
        node["kernel"] = dequantize(stored["value"], stored["scale"])
    return params


@pytest.fixture(scope="module")
def rtn():
    return quantize_with_method(TINY, INT3_G16, random_params(), "rtn")


def test_gptq_notes_calibration_with_fewer_tokens_than_a_layers_inputs():
    """TINY's widest quantized inputs are the MLP down projection's (model.hidden): with fewer calibration tokens
    its Hessian cannot be full rank, which GPTQ says once, in the log and the record."""
    hidden, lines = TINY.hidden, []
    few = random_tokens(max(1, (hidden - 1) // 16))  # sequences of 16 tokens, fewer than `hidden` in all
    assert np.size(few) < hidden
    _, record = quantize_with_method(TINY, INT3_G16, random_params(), "gptq", few, PTQSettings(chunk=4),
                                     log=lines.append)
    notes = [line for line in lines if line.startswith("note: GPTQ")]
    assert notes == [record["note"]]
    assert f"fewer than the {hidden:,} inputs of layer_0/mlp/down" in notes[0]
    assert f"rank at most {np.size(few):,}" in notes[0]
    enough = random_tokens(-(-hidden // 16))
    assert np.size(enough) >= hidden
    _, record = quantize_with_method(TINY, INT3_G16, random_params(), "gptq", enough, PTQSettings(chunk=4),
                                     log=lines.append)
    assert "note" not in record


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_undamped_gptq_on_fewer_tokens_than_a_layers_inputs_is_refused_before_any_work_naming_that_layer(method):
    """With --damp 0 the first layer with more inputs than calibration tokens cannot be inverted: refused in one
    line naming it (not a note about the widest layer followed by an error about another), nothing logged first."""
    lines = []
    for tokens, layer, width in ((random_tokens(1), "layer_0/attn/q", 32), (random_tokens(2), "layer_0/mlp/down", 64)):
        with pytest.raises(UserError) as refused:
            quantize_with_method(TINY, INT3_G16, random_params(), method, tokens,
                                 PTQSettings(gptq=GPTQSettings(damp=0.0)), log=lines.append)
        assert str(refused.value) == (
            f"GPTQ with --damp 0 cannot invert the Hessian of {layer}: its {width} inputs need at least {width} "
            f"calibration tokens, and --calib-batches {len(tokens)} x --calib-seq-len 16 give {tokens.size}; use "
            f"--calib-batches 4 or more, or a positive --damp (default 0.01)")
    assert lines == []


def test_rtn_is_aqts_convert(rtn):
    variables, record = rtn
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, convert(TINY, INT3_G16, random_params()))
    assert record["method"] == "rtn" and "calibration" not in record


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])  # awq alone: awq+gptq minus the GPTQ step
def test_calibrated_methods_serve_exactly_the_weights_they_chose(method, rtn):
    params, calib, tokens = random_params(), random_tokens(8), random_tokens(2, seed=7)
    variables, record = quantize_with_method(TINY, INT3_G16, params, method, calib, PTQSettings(chunk=4))
    assert record["calibration"] == {"split": "train", "sequences": 8, "seq_len": 16, "tokens": 128}
    np.testing.assert_allclose(serve_logits(INT3_G16, variables, tokens),
                               float_logits(dequantized_params(params, variables), tokens), atol=1e-4, rtol=1e-4)
    q = ("layer_0", "attn", "q")
    stored, rtn_stored = quantized_weights(variables["aqt"]), quantized_weights(rtn[0]["aqt"])
    assert not np.array_equal(stored[q]["value"], rtn_stored[q]["value"])
    if "gptq" in method:
        assert set(record["layers"]) == {"/".join(p) for p in rtn_stored}
        assert record["settings"]["gptq"]["block_size"] == 128
    if "awq" in method:
        assert all(0 <= group["alpha"] < 1 for group in record["groups"].values())
    if method == "gptq":  # the first group reads the float embedding: GPTQ on that Hessian, in AQT's layout
        hessian = collect_input_stats(TINY, QuantConfig(), {"params": params}, calib, [q], chunk=4)[q].hessian
        codes, scales = gptq(params["layer_0"]["attn"]["q"]["kernel"], hessian, 3, 16)
        assert stored[q]["value"].shape == (2, 16, 32)
        np.testing.assert_array_equal(np.asarray(stored[q]["value"]).astype(np.int8).reshape(32, 32), codes)
        np.testing.assert_array_equal(np.asarray(stored[q]["scale"]).reshape(2, 32), scales)


def test_smoothquant_w8a8_serves_and_keeps_the_record():
    quant = QuantConfig(mode="serve", weight_bits=8, act_bits=8, numerics="fake")
    params, calib = random_params(), random_tokens(8)
    variables, record = quantize_with_method(TINY, quant, params, "smoothquant", calib)
    assert record["settings"] == {"smoothquant": {"alpha": 0.5}}
    assert np.all(np.isfinite(serve_logits(quant, variables, random_tokens(2))))


@pytest.mark.parametrize("method, quant, calib, message", [
    ("optq", INT3_G16, 4, "--method must be one of"),
    ("gptq", INT3_G16, None, "needs calibration tokens"),
    ("smoothquant", INT3_G16, 4, "needs a scheme that quantizes activations"),
    ("awq", dataclasses.replace(INT3_G16, rules=(QuantRule("/(q|k|v|o|gate|up|down)$|lm_head", weight_bits=None),)),
     4, "quantizes no weight layer"),
])
def test_inapplicable_methods_are_user_errors(method, quant, calib, message):
    cfg = dataclasses.replace(TINY, quantize_attention=True)  # the attention einsums still quantize activations
    with pytest.raises(UserError, match=message):
        quantize_with_method(cfg, quant, random_params(), method, None if calib is None else random_tokens(calib))


def test_calibration_longer_than_the_context_is_a_user_error():
    with pytest.raises(UserError, match="longer than the model's context"):
        quantize_with_method(TINY, INT3_G16, random_params(), "gptq", random_tokens(2, seq=32))
