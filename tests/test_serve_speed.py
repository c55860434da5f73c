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
from slm_jax.sampling import generate
from train.bench import serve_speed
from train.bench.serve_speed import VARIANTS, decode_speed, generate_memory, interleaved_speed, random_served
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


def test_interleaved_speed_reports_per_round_ratios_to_both_floats(monkeypatch):
    # Every variant is really built and timed, but each timing's tokens/s is then replaced by a known figure per
    # (variant, round): a micro model's real decode rates are noise (they even fail to resolve under load), and the
    # point here is the per-round ratio arithmetic, checked against values worked out by hand.
    known = {"float": [(1000.0, 100.0), (1000.0, 300.0)], "float_f32": [(2000.0, 200.0), (2000.0, 200.0)],
             "int8": [(4000.0, 400.0), (500.0, 150.0)]}  # (prefill, decode) tokens/s in rounds 1 and 2
    order, calls = list(known), []

    def known_speed(run, batch, new_tokens, reps, kv_bits=None):
        measured = decode_speed(run, batch, new_tokens, reps, kv_bits)
        name, r = order[len(calls) % 3], len(calls) // 3
        calls.append(name)
        return {**measured, "prefill_tokens_per_s": known[name][r][0], "decode_tokens_per_s": known[name][r][1]}

    monkeypatch.setattr(serve_speed, "decode_speed", known_speed)
    said = []
    found = interleaved_speed(["int8"], SIZE, (1,), 2, 2, said.append)
    rows = {row["name"]: row for row in found["rows"]}
    assert list(rows) == ["float", "float_f32", "int8"] and found["rounds"] == 2  # both floats always timed
    assert calls == order * 2  # variants in turn, round after round
    assert rows["int8"]["param_bytes"] < rows["float"]["param_bytes"] / 2
    assert all(row["generate_temp_bytes"] > 0 for row in rows.values())
    expected = {  # (min, median) over the two rounds of variant / float and variant / float_f32
        ("float_f32", "decode", "float"): (200 / 300, (2 + 200 / 300) / 2),
        ("float", "decode", "float_f32"): (0.5, (0.5 + 1.5) / 2),
        ("int8", "decode", "float"): (0.5, (4 + 0.5) / 2), ("int8", "decode", "float_f32"): (0.75, (2 + 0.75) / 2),
        ("int8", "prefill", "float"): (0.5, (4 + 0.5) / 2), ("int8", "prefill", "float_f32"): (0.25, (2 + 0.25) / 2),
        ("float", "prefill", "float"): (1.0, 1.0), ("float_f32", "decode", "float_f32"): (1.0, 1.0),
    }
    for (name, key, base), (low, mid) in expected.items():
        assert rows[name][f"{key}_tokens_per_s_x_{base}_min"] == pytest.approx(low)
        assert rows[name][f"{key}_tokens_per_s_x_{base}_median"] == pytest.approx(mid)
    assert rows["int8"]["decode_tokens_per_s_median"] == pytest.approx(275.0)
    assert len([line for line in said if line.startswith("round ") and " done, " in line]) == 2  # one per round
    row_lines = [line for line in said if " b=1: " in line]  # one per row, after the progress lines
    assert len(row_lines) == 3
    assert "xbf16 1.00/1.00" in row_lines[0] and "xf32 1.00/1.00" in row_lines[1]


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


def kernel_float32_bytes(run) -> list[int]:
    """float32 bytes of each quantized layer's kernel (what a dequantized copy of it costs)."""
    return [4 * int(np.prod(w["value"].shape)) for w in quantized_weights(run.variables["aqt"]).values()]


@pytest.mark.parametrize("name", ["int4_int", "int4_in_int8"])
def test_a_served_forward_pass_holds_at_most_one_layer_dequantized(name):
    """XLA's compiled memory analysis of a served INT4 forward pass over [4, seq_len] tokens (as train.evaluate
    runs it): its temporary buffers exceed the float32 model's by less than the largest quantized kernel in float32,
    since each layer dequantizes just before its matmul (quant.provider.after_input). Scheduled freely, XLA
    dequantized every layer first: 266,304 temp bytes here against 114,688 for float (139,264 now), 152 KB more
    where the largest kernel is 64 KB."""
    run, float_run = random_served(name, SIZE), random_served("float_f32", SIZE)
    tokens = jnp.zeros((4, run.config.model.seq_len), jnp.int32)
    temp = lambda r: jax.jit(lambda v, t: r.model.apply(v, t)).lower(r.variables, tokens).compile() \
        .memory_analysis().temp_size_in_bytes
    assert temp(run) - temp(float_run) < max(kernel_float32_bytes(run))


def test_generate_decoding_exact_int4_at_batch_1_holds_no_float_copy():
    """`int4_int` (exact INT4 codes, int numerics) generating at batch 1: the decode steps run integer dots and the
    prompt's prefill dequantizes one layer at a time, so generate's temporary buffers stay under half of the float32
    bytes of the quantized kernels (125,648 against 344,064 here; 303,056 before the prefill was tied to its
    inputs). At larger sizes the gap widens: 12.6 MB against 102 MB at d_model 512, 8 layers."""
    run = random_served("int4_int", SIZE)
    found = generate_memory(run, 1, 4)
    assert 0 < found["temp"] < sum(kernel_float32_bytes(run)) / 2


def test_decode_speed_times_the_steps_between_two_generate_lengths(monkeypatch):
    """Decode seconds are generate(n) minus generate(n // 2): a generate with no new tokens is no baseline, since
    XLA drops its unused prefill (which made the committed decode rates include the prefill). Checked with a fake
    clock where generate(n) takes 0.05 s + 2 ms per token and prefill 0.02 s."""
    calls = []

    def fake_generate(model, variables, prompt, rng, n, *args):
        calls.append(n)
        return n

    def fake_timed(fn):
        out = fn()
        return 0.05 + 0.002 * out if isinstance(out, int) else 0.02

    monkeypatch.setattr(serve_speed, "generate", fake_generate)
    monkeypatch.setattr(serve_speed, "timed", fake_timed)
    run = random_served("float_f32", SIZE)
    speed = decode_speed(run, 2, 9, reps=3)
    assert sorted(set(calls)) == [4, 9] and speed["decode_steps"] == 5
    assert speed["decode_ms_per_token"] == pytest.approx(2.0)
    assert speed["decode_tokens_per_s"] == pytest.approx(2 / 0.002)
    assert speed["prefill_tokens_per_s"] == pytest.approx(2 * 8 / 0.02)
    with pytest.raises(ValueError, match="at least 2"):
        decode_speed(run, 1, 1, reps=1)


def test_generate_with_no_new_tokens_runs_no_prefill():
    """Why generate(0) is no baseline: its compiled program has no matmul at all (XLA removed the prefill whose
    result nothing reads), while generate(1) runs the prompt's."""
    run = random_served("float_f32", SIZE)
    prompt = jnp.zeros((1, 8), jnp.int32)
    text = lambda n: generate.lower(run.model, run.variables, prompt, jax.random.PRNGKey(0), n, 0.8, 40, None) \
        .compile().as_text()
    assert not re.search(r" dot\(", text(0)) and re.search(r" dot\(", text(1))


def test_int8_served_in_float16_keeps_its_integer_sums_finite():
    """w8a8 with `int` numerics in float16 compute: AQT rescales the int32 sums in the compute dtype, and float16 tops
    out at 65,504 (4 products of 127 * 127), so with random codes most outputs of the first matmul were inf and
    every logit NaN. quant.provider.float16_safe rescales them in float32: the float16 logits are the float32
    compute's within float16's rounding of the activations."""
    half = random_served("int8", (*SIZE, "train.precision=fp16"))
    full = random_served("int8", (*SIZE, "train.precision=fp32"))
    assert half.model.dtype == jnp.float16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    logits = {name: np.asarray(jax.jit(lambda v, t, r=r: r.model.apply(v, t)[0])(r.variables, tokens), np.float32)
              for name, r in (("half", half), ("full", full))}
    chex.assert_shape(logits["half"], (2, 8, 256))
    assert np.isfinite(logits["half"]).all()
    spread = logits["full"].max() - logits["full"].min()
    assert np.abs(logits["half"] - logits["full"]).max() <= 0.05 * spread


def test_interleaved_speed_reports_an_unresolved_decode_rate_as_missing(monkeypatch):
    """A round whose decode difference was not positive gives no rate (decode_speed's None): the row's median is
    None and printed as n/a with the count of such rounds, never a rate of 0; ratios use the resolved rounds only."""
    calls = {"n": 0, "reps": set()}

    def fake_speed(run, batch, new_tokens, reps, kv_bits=None):
        calls["n"] += 1
        calls["reps"].add(reps)
        unresolved = run.config == "int8" or (run.config == "float" and calls["n"] > 3)
        return {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": None if unresolved else 50.0}

    monkeypatch.setattr(serve_speed, "random_served",
                        lambda name, overrides: serve_speed.Served(name, None, {"params": {"w": jnp.zeros(4)}}))
    monkeypatch.setattr(serve_speed, "decode_speed", fake_speed)
    monkeypatch.setattr(serve_speed, "generate_memory", lambda *args: {"temp": 1})
    said = []
    found = interleaved_speed(["int8"], (), (1,), 4, 2, said.append, reps=3)
    assert calls["reps"] == {3} and found["reps"] == 3  # each round's figures are medians of `reps` timings
    rows = {row["name"]: row for row in found["rows"]}
    assert rows["int8"]["decode_tokens_per_s_median"] is None and rows["int8"]["decode_tokens_per_s_rounds"] == 0
    assert rows["int8"]["decode_tokens_per_s_x_float_median"] is None
    assert rows["float"]["decode_tokens_per_s_median"] == 50.0 and rows["float"]["decode_tokens_per_s_rounds"] == 1
    assert rows["float_f32"]["decode_tokens_per_s_x_float_median"] == 1.0  # round 1 only: float's round 2 missed
    line = next(text for text in said if text.startswith("int8 "))
    assert "decode n/a tok/s (2 of 2 rounds too short to resolve)" in line
    row = next(text for text in said if text.startswith("float b=1: "))
    assert "float b=1: prefill 100 tok/s xbf16" in row and "(1 of 2 rounds too short to resolve)" in row
