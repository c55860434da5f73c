"""Serving variants with random weights in the serving layout (train.bench.serve_speed): no float copy of a quantized
kernel, int4 codes in int8 containers serve the same logits, and the interleaved A/B reports per-round ratios."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.manager import tree_bytes
from quant.plan import make_plan
from quant.serving import float_copies, int8_containers, quantized_weights
from slm_jax.attention import KVCache
from slm_jax.errors import UserError
from train.bench.profiles import MICRO_MODEL
from train.bench.serve_ab import main as serve_ab_main
from train.bench.serve_speed import VARIANTS, interleaved_speed, random_served
from train.config import load_config

SIZE = (*MICRO_MODEL, "model.d_model=64")  # 64: two groups of 32 per row for INT4 g32


def test_every_variant_serves_without_float_kernels():
    # the _f32 variants differ from their namesakes only by the compute dtype
    for name in [name for name in VARIANTS if not name.endswith("_f32")]:
        run = random_served(name, SIZE)
        if run.config.quant.mode == "serve":
            assert float_copies(run.variables, make_plan(run.config.model, run.config.quant)) == []
            assert quantized_weights(run.variables["aqt"])
        else:
            assert "aqt" not in run.variables
        cache = KVCache.init(run.config.model, 1, run.model.dtype)
        logits, _ = jax.jit(run.model.apply)(run.variables, jnp.zeros((1, 4), jnp.int32), cache=cache)
        chex.assert_shape(logits, (1, 4, run.config.model.vocab_size))
        assert bool(jnp.all(jnp.isfinite(logits))), name


def test_int4_codes_in_int8_containers_serve_the_same_logits():
    packed = random_served("int4", SIZE)
    widened = int8_containers(packed.variables)
    for path, stored in quantized_weights(packed.variables["aqt"]).items():
        wide = quantized_weights(widened["aqt"])[path]
        assert wide["value"].dtype == jnp.int8 and stored["value"].dtype in (jnp.int4, jnp.int8)
        np.testing.assert_array_equal(np.asarray(wide["value"]), np.asarray(stored["value"].astype(jnp.int8)))
        assert wide["scale"] is stored["scale"]
    assert widened["params"] is packed.variables["params"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    apply = jax.jit(lambda v, t: packed.model.apply(v, t)[0])
    np.testing.assert_array_equal(np.asarray(apply(widened, tokens), np.float32),
                                  np.asarray(apply(packed.variables, tokens), np.float32))
    int4_bytes = sum(int(np.prod(w["value"].shape)) for w in quantized_weights(packed.variables["aqt"]).values()
                     if w["value"].dtype == jnp.int4)
    assert int4_bytes > 0
    # tree_bytes counts an int4 code as half a byte: the containers cost exactly that half byte more per int4 code
    assert tree_bytes(widened)["total"] - tree_bytes(packed.variables)["total"] == int4_bytes / 2


def test_int_numerics_serve_int4_groups_as_int8_channels_within_bound():
    """served_layout with `int` numerics on CPU: every weight-only per-group layer (not the embedding) becomes int8
    per channel, and the logits stay those of the per-group weights within the re-quantization's small error."""
    grouped, channels = random_served("int4_in_int8", SIZE), random_served("int4_per_channel_int8", SIZE)
    plan = make_plan(channels.config.model, channels.config.quant)
    before = quantized_weights(grouped.variables["aqt"])
    for path, stored in quantized_weights(channels.variables["aqt"]).items():
        per_group = plan[path].group_size is not None and plan[path].kind != "embedding"
        assert stored["value"].ndim == (2 if per_group else before[path]["value"].ndim)
        assert stored["value"].dtype == jnp.int8
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    apply = jax.jit(lambda v, t: channels.model.apply(v, t)[0])
    a = np.asarray(apply(grouped.variables, tokens), np.float32)
    b = np.asarray(apply(channels.variables, tokens), np.float32)
    assert np.abs(a - b).max() <= 0.02 * (a.max() - a.min())
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


def test_int_numerics_keep_exact_int4_codes_unless_asked_to_requantize():
    """Without quant.serve_per_channel_int8, served_layout with `int` numerics keeps every per-group layer's exact
    codes (int8 containers of the int4 ones, same shapes); the flag needs int numerics, and fake refuses it."""
    exact = random_served("int4_int", SIZE)
    codes = random_served("int4", SIZE)  # the same seed: the same codes, packed int4
    packed = quantized_weights(codes.variables["aqt"])
    for path, stored in quantized_weights(exact.variables["aqt"]).items():
        assert stored["value"].dtype == jnp.int8 and stored["value"].shape == packed[path]["value"].shape
        np.testing.assert_array_equal(np.asarray(stored["value"]), np.asarray(packed[path]["value"], np.int8))
    with pytest.raises(UserError, match="serve_per_channel_int8"):
        load_config("ptq_int4", ["quant.numerics=fake", "quant.serve_per_channel_int8=true"])


def test_interleaved_speed_reports_per_round_ratios_to_both_floats():
    said = []
    found = interleaved_speed(["int8"], SIZE, (1,), 2, 2, said.append)
    rows = {row["name"]: row for row in found["rows"]}
    assert list(rows) == ["float", "float_f32", "int8"] and found["rounds"] == 2  # both floats always timed
    assert rows["float"]["prefill_tokens_per_s_x_float_median"] == 1.0
    assert rows["float_f32"]["decode_tokens_per_s_x_float_f32_median"] == 1.0
    assert rows["int8"]["param_bytes"] < rows["float"]["param_bytes"] / 2
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        # the same two rounds a, b both ways: f32 x bf16 has min(a, b) and (a + b) / 2, bf16 x f32 has 1 / max(a, b)
        f32 = rows["float_f32"]
        assert f32[f"{key}_x_float_min"] == pytest.approx(
            2 * f32[f"{key}_x_float_median"] - 1 / rows["float"][f"{key}_x_float_f32_min"])
    for row in rows.values():
        assert row["prefill_tokens_per_s_median"] > 0
        for base in ("float", "float_f32"):
            assert row[f"prefill_tokens_per_s_x_{base}_min"] <= row[f"prefill_tokens_per_s_x_{base}_median"]
    assert len(said) == 2 + 3  # one line per round, one per row
    assert "xbf16 1.00/1.00" in said[2] and "xf32 1.00/1.00" in said[3]


def test_activations_are_quantized_once_per_distinct_input():
    """q/k/v read one input and gate/up another: XLA's common-subexpression pass leaves one activation quantization
    (one round-to-nearest-even) per distinct matmul input in the compiled served model, not one per matmul: per
    layer attention input, o's input, MLP input, down's input, and the lm_head's input (15 quantized matmuls)."""
    run = random_served("int8", (*SIZE, "model.n_layers=2"))
    compiled = jax.jit(lambda v, t: run.model.apply(v, t)[0]).lower(run.variables, jnp.zeros((1, 4), jnp.int32))
    text = compiled.compile().as_text()
    assert len(re.findall(r"round-nearest-even\(", text)) == 4 * 2 + 1


def test_serve_ab_refuses_an_unwritable_json_before_timing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_ab_main(["--size", "bundled", "--variants", "float", "--json", str(tmp_path / "missing" / "x.json")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""  # nothing was timed
    assert err == f"error: --json {tmp_path / 'missing' / 'x.json'}: its folder does not exist or is not writable\n"
