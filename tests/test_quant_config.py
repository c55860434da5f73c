"""QuantConfig validation and per-layer plan resolution: every impossible request is one UserError naming its key."""
import dataclasses

import pytest

from quant.config import QuantConfig, QuantRule
from quant.plan import format_plan, make_plan, plan_to_json
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError

CFG = ModelConfig(vocab_size=256, seq_len=16, n_layers=2, n_heads=4, d_model=64, tie_embeddings=False)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, "8", True, 8.0])
@pytest.mark.parametrize("key", ["weight_bits", "act_bits", "bwd_bits", "embed_bits"])
def test_bad_bit_widths_name_the_key(key, bits):
    with pytest.raises(UserError, match=rf"quant\.{key} must be an integer from 2 to 8") as err:
        QuantConfig(**{key: bits})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("mode", "int8", "quant.mode must be one of none, qat, serve"),
    ("granularity", "per_tensor", "quant.granularity must be one of per_channel, per_group"),
    ("numerics", "float", "quant.numerics must be one of auto, int, fake"),
    ("group_size", 0, "quant.group_size must be a positive integer"),
    ("scale_dtype", "float64", "quant.scale_dtype must be one of float32, bfloat16, float16"),
])
def test_bad_choices_list_the_allowed_values(field, value, message):
    with pytest.raises(UserError, match=message):
        QuantConfig(**{field: value})


def test_bad_rule_values_name_the_rule():
    with pytest.raises(UserError, match=r"quant\.rules\[1\]\.weight_bits must be an integer from 2 to 8"):
        QuantConfig(rules=(QuantRule(match="mlp"), QuantRule(match="attn", weight_bits=16)))
    with pytest.raises(UserError, match=r"quant\.rules\[0\]\.match is not a valid regex"):
        QuantConfig(rules=(QuantRule(match="layer_(0"),))
    with pytest.raises(UserError, match=r"quant\.rules\[0\]\.granularity must be one of"):
        QuantConfig(rules=(QuantRule(match="mlp", granularity="per_row"),))


def test_group_size_must_divide_each_layer_width_at_plan_time():
    with pytest.raises(UserError, match=r"quant\.group_size \(48\) must divide the input width of layer_0/attn/q"):
        make_plan(CFG, QuantConfig(granularity="per_group", group_size=48))
    rules = (QuantRule(match="mlp/down", granularity="per_group", group_size=128),)
    with pytest.raises(UserError, match=r"quant\.rules\[0\]\.group_size \(128\) must divide .* layer_0/mlp/down \(192\)"):
        make_plan(CFG, QuantConfig(rules=rules))


def test_a_rule_that_matches_no_layer_is_an_error():
    with pytest.raises(UserError, match=r"quant\.rules\[0\]\.match 'attn/qk' matches no layer"):
        make_plan(CFG, QuantConfig(rules=(QuantRule(match="attn/qk", weight_bits=4),)))


def test_rules_override_in_order_and_unset_fields_inherit():
    rules = (QuantRule(match="lm_head", weight_bits=None),
             QuantRule(match="layer_0/mlp", weight_bits=4, granularity="per_group", group_size=16),
             QuantRule(match="mlp", act_bits=None))  # layer_0/mlp already matched the rule above
    plan = make_plan(CFG, QuantConfig(weight_bits=8, act_bits=8, rules=rules))
    assert plan[("lm_head",)] is None
    up0, up1, q0 = plan[("layer_0", "mlp", "up")], plan[("layer_1", "mlp", "up")], plan[("layer_0", "attn", "q")]
    assert (up0.weight_bits, up0.act_bits, up0.granularity, up0.group_size) == (4, 8, "per_group", 16)
    assert (up1.weight_bits, up1.act_bits, up1.granularity, up1.group_size) == (8, None, "per_channel", None)
    assert (q0.weight_bits, q0.act_bits) == (8, 8)
    assert plan[("embed",)] is None  # the embedding table stays float unless quant.embed_bits is set
    assert list(plan)[:5] == [("embed",), ("layer_0", "attn", "q"), ("layer_0", "attn", "k"), ("layer_0", "attn", "v"),
                              ("layer_0", "attn", "o")]


def test_attention_einsums_join_the_plan_only_when_asked():
    cfg = ModelConfig(vocab_size=256, seq_len=16, n_layers=1, n_heads=4, d_model=64, quantize_attention=True)
    plan = make_plan(cfg, QuantConfig(weight_bits=4, act_bits=8, granularity="per_group",
                                      rules=(QuantRule(match="attn/pv", weight_bits=None),)))
    qk = plan[("layer_0", "attn", "qk")]
    assert (qk.kind, qk.weight_bits, qk.act_bits, qk.granularity) == ("attention", 8, 8, "per_channel")
    assert plan[("layer_0", "attn", "pv")] is None
    assert ("lm_head",) not in plan  # tied embeddings: the head is the float embedding table
    assert ("layer_0", "attn", "qk") not in make_plan(CFG, QuantConfig())


def test_plan_prints_as_a_table_and_saves_as_json():
    plan = make_plan(CFG, QuantConfig(weight_bits=4, granularity="per_group", embed_bits=8, scale_dtype="bfloat16",
                                      rules=(QuantRule(match="lm_head", weight_bits=None),)))
    table = format_plan(plan).splitlines()
    assert table[0].split() == ["layer", "weights", "activations", "scales", "gradients"]
    assert table[2].split() == ["embed", "int8", "float", "per_channel", "float"]
    assert table[3].split() == ["layer_0/attn/q", "int4", "float", "per_group(32)", "float"]
    assert table[-1].split() == ["lm_head", "float", "float", "-", "float"]
    saved = plan_to_json(plan)
    assert saved["lm_head"] is None
    assert saved["layer_1/mlp/down"] == {"weight_bits": 4, "act_bits": None, "granularity": "per_group",
                                         "group_size": 32, "bwd_bits": None, "kind": "weight",
                                         "scale_dtype": "bfloat16", "scheme": "aqt"}
    assert saved["embed"]["kind"] == "embedding" and saved["embed"]["act_bits"] is None


def test_a_quantized_embedding_cannot_be_tied_to_the_head():
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    with pytest.raises(UserError, match=r"quant.embed_bits \(--embed-bits\): the model ties its embedding table to "
                                        r"the LM head, which keeps it float; drop --embed-bits"):
        make_plan(tied, QuantConfig(weight_bits=8, embed_bits=8))
    with pytest.raises(UserError, match=r"quant.rules\[0\].weight_bits: the model ties .* skip embed"):
        make_plan(tied, QuantConfig(weight_bits=8, rules=(QuantRule(match="embed", weight_bits=8),)))
    assert make_plan(tied, QuantConfig(weight_bits=8))[("embed",)] is None
