"""The quantized model: error against float, fake vs int numerics, QAT -> convert -> serve, and QAT training."""
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quant.config import QuantConfig, QuantRule
from quant.serving import (check_serving_variables, convert, float_copies, quantized_weights,
                           replace_quantized_weights, serving_bytes)
from quant.plan import make_plan
from quant.provider import make_matmul
from slm_jax import ModelConfig, Transformer
from slm_jax.errors import UserError

CFG = ModelConfig(vocab_size=256, seq_len=16, n_layers=2, n_heads=4, d_model=64, tie_embeddings=False)
ONE_LAYER = dataclasses.replace(CFG, n_layers=1)  # where compile time matters more than depth
ATTN_CFG = dataclasses.replace(ONE_LAYER, quantize_attention=True)
TOKENS = np.random.default_rng(2).integers(0, 256, (4, 16), dtype=np.int32)  # host arrays: eager jax ops compile


@functools.cache
def float_params(cfg: ModelConfig = CFG):
    """Float params without compiling the model's init: Laplace kernels, heavy-tailed like trained weights."""
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), TOKENS[:1])))["params"]
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        return rng.laplace(scale=0.02, size=leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def apply_fn(cfg: ModelConfig, quant_cfg: QuantConfig | None = None, mode: str = "qat"):
    """Jitted `apply` of the model with quant_cfg in `mode` (float when None); cached, so each compiles once."""
    return jax.jit(Transformer(cfg, matmul=None if quant_cfg is None else make_matmul(cfg, quant_cfg, mode)).apply)


FLOAT_HEAD = (QuantRule(match="lm_head", weight_bits=None),)
INT8 = QuantConfig(weight_bits=8, rules=FLOAT_HEAD)
INT4 = QuantConfig(weight_bits=4, rules=FLOAT_HEAD)
INT4_GROUPS = QuantConfig(weight_bits=4, granularity="per_group", group_size=16, rules=FLOAT_HEAD)  # fake on CPU
W8A8_ATTENTION = QuantConfig(weight_bits=8, act_bits=8, numerics="int")


def logits(quant_cfg=None, cfg=CFG):
    return apply_fn(cfg, quant_cfg)({"params": float_params(cfg)}, TOKENS)[0]


@functools.cache
def served(cfg: ModelConfig, quant_cfg: QuantConfig):
    """(serving variables from `convert`, logits of the serving model on them)."""
    serving = convert(cfg, quant_cfg, float_params(cfg))
    return serving, apply_fn(cfg, quant_cfg, "serve")(serving, TOKENS)[0]


def rel_error(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_int8_is_closer_to_float_than_int4_and_groups_help_int4():
    ref = logits()
    err = {name: rel_error(logits(q), ref) for name, q in [("int8", INT8), ("int4", INT4), ("groups", INT4_GROUPS)]}
    assert err["int8"] < 0.05
    assert err["int4"] < 0.6
    assert err["int8"] < err["int4"] / 5
    assert err["groups"] < err["int4"] * 0.85


def test_fake_numerics_agree_with_int_numerics():
    y_int = logits(dataclasses.replace(INT4_GROUPS, numerics="int"))
    np.testing.assert_allclose(logits(dataclasses.replace(INT4_GROUPS, numerics="fake")), y_int, rtol=1e-5, atol=1e-5)


def test_attention_einsums_are_quantized_only_when_planned():
    ref = logits(cfg=ONE_LAYER)  # the float model: quantize_attention only matters to a quantized one
    only_attention = QuantConfig(weight_bits=None, rules=(QuantRule(match="attn/(qk|pv)", weight_bits=8),))
    assert 1e-4 < rel_error(logits(only_attention, ATTN_CFG), ref) < 0.05


@pytest.mark.parametrize("cfg, quant_cfg", [
    (CFG, INT4_GROUPS), (ATTN_CFG, W8A8_ATTENTION), (ONE_LAYER, dataclasses.replace(INT4_GROUPS, scale_dtype="bfloat16"))],
    ids=["int4-per-group-float-head", "int8-w8a-attention", "int4-bf16-scales"])
def test_convert_then_serve_reproduces_the_qat_forward(cfg, quant_cfg):
    serving, served_logits = served(cfg, quant_cfg)
    np.testing.assert_allclose(served_logits, logits(quant_cfg, cfg), rtol=1e-5, atol=1e-5)
    plan = make_plan(cfg, quant_cfg)
    assert float_copies(serving, plan) == []
    kernels = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(serving["params"])[0]
               if "kernel" in jax.tree_util.keystr(p)]
    assert kernels == (["['lm_head']['kernel']"] if plan[("lm_head",)] is None else [])
    up = serving["aqt"]["layer_0"]["mlp"]["up"]["dot_general"]["aqt"]["qrhs"]
    if quant_cfg.granularity == "per_channel":
        chex.assert_shape([up["value"], up["scale"]], [(64, 192), (1, 1, 192)])
        chex.assert_type(up["value"], jnp.int8)
    else:
        chex.assert_shape([up["value"], up["scale"]], [(4, 16, 192), (4, 1, 1, 192)])
        chex.assert_type(up["value"], jnp.int4)
    chex.assert_type(up["scale"], jnp.dtype(quant_cfg.scale_dtype))


def test_serving_variables_hold_int4_kernels_and_no_float_copy():
    params = float_params()
    serving, _ = served(CFG, INT4_GROUPS)
    sizes, float_size = serving_bytes(serving), serving_bytes({"params": params})["total"]
    kernels = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if "kernel" in str(p) and "lm_head" not in str(p))
    scales = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(serving["aqt"])[0] if "scale" in str(p))
    assert sizes["int4"] == kernels / 2 and "int8" not in sizes
    assert sizes["float32"] == float_size - 4 * kernels + 4 * scales  # float kernels gone, float scales added
    with pytest.raises(UserError, match="still hold float kernels of quantized layers: layer_0/attn/q"):
        check_serving_variables(CFG, INT4_GROUPS, {"params": params, "aqt": serving["aqt"]})


def train(cfg: ModelConfig, quant_cfg: QuantConfig, steps: int = 8, dropout_rng: bool = True):
    """Adam on one fixed batch of the tiny model in QAT mode: (losses, gradients of the last step).

    The dropout rng, which train steps pass, also drives stochastic rounding of quantized gradients (bwd_bits)."""
    model = Transformer(cfg, matmul=make_matmul(cfg, quant_cfg, "qat"))
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    tx = optax.adam(3e-3)

    def loss_fn(params, rng):
        out, _ = model.apply({"params": params}, inputs, deterministic=False,
                             rngs={"dropout": rng} if dropout_rng else {})
        return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

    def step(carry, rng):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), (loss, grads)

    @jax.jit
    def run(params):
        _, (losses, grads) = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(0), steps))
        return losses, jax.tree_util.tree_map(lambda g: g[-1], grads)

    return run(float_params(cfg))


def test_w8a8_qat_with_int_numerics_trains_like_fake_numerics():
    """configs/int8_qat trains with `int` numerics on CPU (faster): the integer forward computes the fake one's
    quantized products exactly, so losses agree to float rounding and straight-through gradients nearly so: float
    rounding may flip a code at a rounding boundary now and then (0.07% of the embedding's gradient here; up to 1% per
    leaf in one step of `int8_qat`'s 4 layers), against 6% between this model's w8a8 and weight-only gradients."""
    w8a8 = QuantConfig(weight_bits=8, act_bits=8, embed_bits=8)
    (loss_fake, grads_fake), (loss_int, grads_int) = (
        train(ONE_LAYER, dataclasses.replace(w8a8, numerics=numerics), steps=4) for numerics in ("fake", "int"))
    np.testing.assert_allclose(loss_int, loss_fake, rtol=1e-5)
    for path, a in jax.tree_util.tree_flatten_with_path(grads_fake)[0]:
        b = functools.reduce(lambda tree, key: tree[key.key], path, grads_int)
        assert rel_error(np.asarray(b), np.asarray(a)) < 0.01, jax.tree_util.keystr(path)


@pytest.mark.parametrize("quant_cfg", [
    QuantConfig(weight_bits=8, rules=(  # INT8 and INT4, weight-only and weights+activations, in one model
        QuantRule(match="attn", weight_bits=4, act_bits=8, granularity="per_group", group_size=16),
        QuantRule(match="mlp/gate", weight_bits=4),
        QuantRule(match="mlp/up", act_bits=8))),
    QuantConfig(weight_bits=8, act_bits=8, bwd_bits=8, numerics="int"),
], ids=["int8-int4-mixed", "w8a8-bwd8-int"])
def test_qat_lowers_the_loss_with_finite_gradients_in_every_layer(quant_cfg):
    """One layer deep, to keep compile time down. (Stochastic rounding of bwd_bits gradients is checked on a single
    Linear in test_quant_numerics: it doubles a model's compile time.)"""
    losses, grads = train(ONE_LAYER, quant_cfg, dropout_rng=quant_cfg.bwd_bits is None)
    assert losses[-1] < losses[0] - 0.05
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_a_quantized_embedding_table_is_stored_as_int8_and_served_like_its_qat_forward():
    quant_cfg = QuantConfig(weight_bits=4, granularity="per_group", group_size=16, embed_bits=8, rules=FLOAT_HEAD)
    serving, served_logits = served(ONE_LAYER, quant_cfg)
    np.testing.assert_allclose(served_logits, logits(quant_cfg, ONE_LAYER), rtol=1e-5, atol=1e-5)
    assert "embed" not in serving["params"]  # no float copy of the table
    table = serving["aqt"]["embed"]["dot_general"]["aqt"]["qrhs"]
    chex.assert_shape([table["value"], table["scale"]], [(256, 64), (1, 1, 64)])
    chex.assert_type([table["value"], table["scale"]], [jnp.int8, jnp.float32])
    # The reference: per-column abs-max int8 of the float table, looked up row by row.
    float_table = np.asarray(float_params(ONE_LAYER)["embed"]["embedding"])
    scale = np.abs(float_table).max(axis=0) / 127.5  # AQT maps the max to the edge of the last int8 bucket
    np.testing.assert_allclose(np.asarray(table["scale"]).reshape(-1), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(table["value"]), np.clip(np.round(float_table / scale), -127, 127))
    assert 0 < rel_error(logits(quant_cfg, ONE_LAYER), logits(dataclasses.replace(quant_cfg, embed_bits=None),
                                                                 ONE_LAYER)) < 0.02


def test_bfloat16_scales_shrink_the_serving_model():
    quant_cfg = QuantConfig(weight_bits=4, granularity="per_group", group_size=16, embed_bits=8)
    f32, _ = served(ONE_LAYER, quant_cfg)
    bf16, bf16_logits = served(ONE_LAYER, dataclasses.replace(quant_cfg, scale_dtype="bfloat16"))
    scales = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(f32["aqt"])[0] if "scale" in str(p))
    assert serving_bytes(f32)["total"] - serving_bytes(bf16)["total"] == 2 * scales
    assert all(x.dtype == jnp.bfloat16 for p, x in jax.tree_util.tree_flatten_with_path(bf16["aqt"])[0]
               if "scale" in str(p))
    # bf16 scales round each group's scale: a small change next to int4's own error.
    f32_logits = served(ONE_LAYER, quant_cfg)[1]
    assert rel_error(bf16_logits, f32_logits) < 0.25 * rel_error(f32_logits, logits(cfg=ONE_LAYER))


def test_replaced_integer_weights_are_what_the_serving_model_computes_with():
    serving, _ = served(CFG, INT4_GROUPS)
    stored = quantized_weights(serving["aqt"])
    path = ("layer_0", "mlp", "up")
    value = np.asarray(stored[path]["value"]).astype(np.int8)
    flipped = {path: {"value": jnp.asarray(-np.clip(value, -7, 7), jnp.int4), "scale": stored[path]["scale"]}}
    replaced = {**serving, "aqt": replace_quantized_weights(serving["aqt"], flipped)}
    new = quantized_weights(replaced["aqt"])
    np.testing.assert_array_equal(np.asarray(new[path]["value"]).astype(np.int8), -np.clip(value, -7, 7))
    other = ("layer_0", "mlp", "down")
    np.testing.assert_array_equal(np.asarray(new[other]["value"]), np.asarray(stored[other]["value"]))
    out = apply_fn(CFG, INT4_GROUPS, "serve")(replaced, TOKENS)[0]
    assert not np.allclose(out, served(CFG, INT4_GROUPS)[1], atol=1e-3)
    with pytest.raises(UserError, match="layer_0/mlp/up value: expected"):
        replace_quantized_weights(serving["aqt"], {path: {"value": value, "scale": stored[path]["scale"]}})
    with pytest.raises(UserError, match="no quantized weight stored for layer lm_head"):
        replace_quantized_weights(serving["aqt"], {("lm_head",): flipped[path]})
