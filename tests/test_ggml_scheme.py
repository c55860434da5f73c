"""The ggml schemes in the `quant` section: what they fix and refuse, QAT through `quant.ggml.fake_quant`, and
`quant.convert` storing exactly gguf's blocks, served with exactly the QAT forward."""
import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant import ggml
from quant.config import QuantConfig, QuantRule
from quant.serving import convert, quantized_weights
from quant.plan import make_plan
from quant.provider import make_matmul
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from train.config_loader import build, to_dict

MODEL = ModelConfig(vocab_size=256, seq_len=16, n_layers=1, n_heads=2, n_kv_heads=1, d_model=64,
                    tie_embeddings=False)
GGUF_TYPE = {ggml.Q8_0: gguf.GGMLQuantizationType.Q8_0, ggml.Q4_0: gguf.GGMLQuantizationType.Q4_0}


@pytest.fixture(scope="module")
def params():
    init = jax.jit(lambda: Transformer(MODEL).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    return nn.unbox(init()["params"])


def logits(model: Transformer, variables) -> jax.Array:
    return jax.jit(lambda v: model.apply(v, tokens())[0])(variables)


def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def test_ggml_scheme_fixes_bits_blocks_and_scales_and_round_trips():
    cfg = build(QuantConfig, {"mode": "qat", "scheme": "ggml_q4_0"}, prefix="quant.")
    assert (cfg.weight_bits, cfg.granularity, cfg.group_size, cfg.scale_dtype) == (4, "per_group", 32, "float16")
    assert build(QuantConfig, to_dict(cfg), prefix="quant.") == cfg
    plan = make_plan(MODEL, QuantConfig(mode="qat", scheme="ggml_q8_0", rules=(QuantRule("lm_head", weight_bits=None),
                                                                               QuantRule("mlp/down", weight_bits=4))))
    assert plan[("lm_head",)] is None and plan[("embed",)] is None
    assert plan[("layer_0", "mlp", "down")].scheme == ggml.Q4_0
    assert plan[("layer_0", "attn", "q")].scheme == ggml.Q8_0 and plan[("layer_0", "attn", "q")].group_size == 32


@pytest.mark.parametrize("values, message", [
    ({"weight_bits": 6}, "quant.weight_bits: scheme ggml_q4_0 fixes it to 4"),
    ({"scale_dtype": "bfloat16"}, "quant.scale_dtype: scheme ggml_q4_0 fixes it to 'float16'"),
    ({"act_bits": 8}, "quant.act_bits must be null with scheme ggml_q4_0"),
    ({"embed_bits": 8}, "quant.embed_bits must be null"),
    ({"rules": [{"match": "lm_head", "weight_bits": 6}]}, r"quant.rules\[0\].weight_bits must be null"),
    ({"rules": [{"match": "lm_head", "group_size": 64}]}, r"quant.rules\[0\]: only match and weight_bits"),
    ({"scheme": "ggml_q5_0"}, "quant.scheme must be one of aqt, ggml_q8_0, ggml_q4_0"),
])
def test_ggml_scheme_refusals_name_the_key(values, message):
    with pytest.raises(UserError, match=message):
        build(QuantConfig, {"mode": "qat", "scheme": "ggml_q4_0", **values}, prefix="quant.")


def test_ggml_blocks_must_divide_every_quantized_input_width():
    narrow = ModelConfig(vocab_size=256, seq_len=16, n_layers=1, n_heads=2, d_model=48, tie_embeddings=False)
    with pytest.raises(UserError, match="ggml blocks of 32 must divide its input width"):
        make_plan(narrow, QuantConfig(mode="qat", scheme="ggml_q8_0"))
    with pytest.raises(UserError, match="quantizes the embedding table"):
        make_plan(MODEL, QuantConfig(mode="qat", scheme="ggml_q8_0", rules=(QuantRule("embed", weight_bits=8),)))


@pytest.mark.parametrize("scheme", ggml.SCHEMES)
def test_convert_stores_gguf_blocks_and_serves_the_qat_forward(params, scheme):
    quant = QuantConfig(mode="serve", scheme=scheme, rules=(QuantRule("lm_head", weight_bits=None),))
    variables = convert(MODEL, quant, params)
    stored = quantized_weights(variables["aqt"])
    assert ("lm_head",) not in stored and "kernel" in variables["params"]["lm_head"]
    assert len(stored) == 7
    for path, arrays in stored.items():
        assert arrays["scale"].dtype == jnp.float16
        kernel = np.asarray(params[path[0]][path[1]][path[2]]["kernel"])
        codes = np.asarray(arrays["value"]).astype(np.int8)
        block_bytes = ggml.to_block_bytes(codes, np.asarray(arrays["scale"])[:, 0, 0, :], scheme)
        np.testing.assert_array_equal(block_bytes, gguf.quants.quantize(kernel.T, GGUF_TYPE[scheme]))
    served = logits(Transformer(MODEL, matmul=make_matmul(MODEL, quant, "serve")), variables)
    qat = logits(Transformer(MODEL, matmul=make_matmul(MODEL, quant, "qat")), {"params": params})
    np.testing.assert_array_equal(np.asarray(served), np.asarray(qat))
    float_logits = logits(Transformer(MODEL), {"params": params})
    assert float(jnp.abs(qat - float_logits).max()) > 1e-5  # and it is really quantized


def test_qat_gradient_is_the_float_gradient_at_the_quantized_weights(params):
    """Straight-through: d loss / d W under QAT equals the float model's gradient evaluated at fake_quant(W)."""
    quant = QuantConfig(mode="qat", scheme="ggml_q4_0")
    qat_model = Transformer(MODEL, matmul=make_matmul(MODEL, quant))
    float_model = Transformer(MODEL)
    loss = lambda model: lambda p: jnp.mean(model.apply({"params": p}, tokens())[0] ** 2)
    quantized = jax.tree_util.tree_map_with_path(
        lambda path, w: ggml.fake_quant(w, ggml.Q4_0) if path[-1].key == "kernel" else w, params)
    got = jax.jit(jax.grad(loss(qat_model)))(params)
    want = jax.jit(jax.grad(loss(float_model)))(quantized)
    for path in (("layer_0", "attn", "k"), ("layer_0", "mlp", "down"), ("lm_head",)):
        g, w = got, want
        for key in path + ("kernel",):
            g, w = g[key], w[key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-8)
        assert float(jnp.abs(g).max()) > 0
