"""Serving speed: prefill and KV-cache decode tokens/s of one model, and float against quantized variants timed in
turn round after round in one process (ratios per round, so load hits every variant alike), with the peak RSS of
each variant in a child (`python -m train.bench.serve_ab`). Weights are random, made in the serving layout directly
(integer codes and scales, never a float kernel): speed and memory do not depend on the values.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.manager import tree_bytes
from quant.serving import check_serving_variables, int8_containers, served_layout
from slm_jax.attention import KVCache, serving_cache_dtype
from slm_jax.sampling import cache_size, generate
from train.bench.common import peak_rss, timed
from train.bench.profiles import LARGER, SMOLLM2_135M
from train.bench.trust import spread
from train.build import build_model
from train.config import load_config
from train.metrics import format_duration

# name -> (config, overrides, KV cache bits, serving layout: None, "containers" (int4 codes held in int8) or
# "served" (quant.serving.served_layout, as train.generate serves the run on this backend))
VARIANTS = {
    "float": ("baseline", (), None, None),  # bf16 compute over float32 params, as the baseline trains
    "float_f32": ("baseline", ("train.precision=fp32",), None, None),
    "float_kv8": ("baseline", (), 8, None),
    "int8": ("ptq_int8", (), None, None),  # w8a8, int numerics
    "int8_w8": ("ptq_int8", ("quant.act_bits=null", "quant.numerics=fake"), None, None),
    # weight-only int numerics on CPU: one int8 dot over hi/lo int8 halves of the activations (quant.serving_int)
    "int8_w8_int": ("ptq_int8", ("quant.act_bits=null",), None, None),
    "int4": ("ptq_int4", ("quant.numerics=fake",), None, None),  # w4 g32, packed int4, dequantized
    "int4_in_int8": ("ptq_int4", ("quant.numerics=fake",), None, "containers"),  # the same codes in int8 containers
    "int4_w4a8": ("ptq_int4", ("quant.act_bits=8", "quant.numerics=int"), None, "containers"),
    "int4_per_channel_int8": ("ptq_int4", ("quant.numerics=int", "quant.serve_per_channel_int8=true"), None, "served"),
    # the exact int4 codes (int8 containers) with int numerics: decoding (up to 2 rows) serves one int8 dot batched
    # over groups on hi/lo activations (quant.serving_group), more rows the dequantized matmul
    "int4_int": ("ptq_int4", ("quant.numerics=int",), None, "served"),
    # float32 compute around the same integer weights (faster than bf16 on this CPU, as for float)
    "int8_f32": ("ptq_int8", ("train.precision=fp32",), None, None),
    "int4_per_channel_int8_f32": ("ptq_int4", ("quant.numerics=int", "quant.serve_per_channel_int8=true",
                                               "train.precision=fp32"), None, "served"),
    "int4_int_f32": ("ptq_int4", ("quant.numerics=int", "train.precision=fp32"), None, "served"),
}
SIZES = {"bundled": (), "larger": LARGER, "smollm2": (*SMOLLM2_135M, "quant.embed_bits=null")}


def decode_speed(run, batch: int, new_tokens: int, reps: int, kv_bits: int | None = None) -> dict:
    """Prefill of a seq_len/2 prompt, timed alone, and `generate` (prefill + new_tokens decode steps, sampling
    at temperature 0.8, top-k 40 as train.generate does), with an int8 KV cache when kv_bits is 8. Decode seconds =
    generate with `new_tokens` minus the same generate with `new_tokens // 2` (both run the prompt's prefill, the
    first sample and a decode loop, so the difference is `decode_steps` = new_tokens - new_tokens // 2 decode steps;
    a generate with no new tokens is no baseline: XLA drops its unused prefill), medians of `reps` runs after
    compilation (`time.perf_counter`); decode tokens/s = batch * decode_steps / decode seconds, None when load made
    the difference not positive (too few new tokens to resolve), never a clamped rate.
    Raises ValueError for new_tokens < 2."""
    if new_tokens < 2:
        raise ValueError(f"decode_speed needs at least 2 new tokens, got {new_tokens}")
    model, variables, cfg = run.model, run.variables, run.config.model
    prompt_len = max(1, cfg.seq_len // 2)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    dtype = serving_cache_dtype(model.dtype)  # as generate holds it
    prefill = jax.jit(lambda v, p: model.apply(v, p, cache=KVCache.init(cfg, p.shape[0], dtype, bits=kv_bits)))
    rng = jax.random.PRNGKey(0)
    run_prefill = lambda: prefill(variables, prompt)
    run_generate = lambda n: lambda: generate(model, variables, prompt, rng, n, 0.8, 40, kv_bits)
    baseline_tokens = new_tokens // 2
    first_prefill, first_generate = timed(run_prefill), timed(run_generate(new_tokens))
    timed(run_generate(baseline_tokens))
    prefills = spread(timed(run_prefill) for _ in range(reps))
    generates = spread(timed(run_generate(new_tokens)) for _ in range(reps))
    baselines = spread(timed(run_generate(baseline_tokens)) for _ in range(reps))
    prefill_s, generate_s = prefills["median"], generates["median"]
    decode_s = generate_s - baselines["median"]
    decode_s = decode_s if decode_s > 0 else None
    steps = new_tokens - baseline_tokens
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, dtype, cache_size(model, prompt_len, new_tokens), kv_bits))
    return {"batch": batch, "kv_bits": kv_bits, "kv_cache_bytes": cache.nbytes(), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "decode_steps": steps, "baseline_generate_s": baselines["median"],
            "first_prefill_s": first_prefill, "first_generate_s": first_generate,
            "prefill_s": prefill_s, "generate_s": generate_s, "prefill_spread": prefills, "generate_spread": generates,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": decode_s and batch * steps / decode_s,
            "decode_ms_per_token": decode_s and 1000 * decode_s / steps}


def generate_memory(run, batch: int, new_tokens: int, kv_bits: int | None = None) -> dict:
    """XLA's buffer assignment for `generate` of `new_tokens` after a seq_len/2 prompt at `batch` (compiled memory
    analysis, bytes): `argument` (the variables and prompt), `temp` (every buffer the program allocates while it
    runs: activations, KV cache, and any float weights it dequantizes and keeps) and `output`. A float copy of a
    quantized model shows here exactly, where peak RSS mixes it with the runtime and the compiler."""
    cfg = run.config.model
    prompt = jnp.zeros((batch, max(1, cfg.seq_len // 2)), jnp.int32)
    lowered = generate.lower(run.model, run.variables, prompt, jax.random.PRNGKey(0), new_tokens, 0.8, 40, kv_bits)
    found = lowered.compile().memory_analysis()
    return {"argument": found.argument_size_in_bytes, "temp": found.temp_size_in_bytes,
            "output": found.output_size_in_bytes}


class Served(NamedTuple):
    """What decode_speed reads of a run: its config, model and variables."""

    config: object
    model: object
    variables: dict


def random_served(variant: str, size_overrides=(), seed: int = 0) -> Served:
    """A model of `variant` (see VARIANTS) with random weights in its serving layout: float params from the model's
    init; quantized layers' codes uniform over their integer range and scales 1/(64 * sqrt(in)), so activations
    keep a sane size. Checked by `check_serving_variables` (no float copy of a quantized kernel)."""
    config_name, overrides, _, layout = VARIANTS[variant]
    cfg = load_config(config_name, (*size_overrides, *overrides))
    model = build_model(cfg)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32)))
    if "aqt" in variables:
        rng = np.random.default_rng(seed)

        def fill(leaf):
            if jnp.issubdtype(leaf.dtype, jnp.integer):
                bound = int(jnp.iinfo(leaf.dtype).max)
                return jnp.asarray(rng.integers(-bound, bound + 1, leaf.shape, np.int8)).astype(leaf.dtype)
            return jnp.full(leaf.shape, 1.0 / (64 * np.sqrt(cfg.model.d_model)), leaf.dtype)

        variables["aqt"] = jax.tree_util.tree_map(fill, variables["aqt"])
        check_serving_variables(cfg.model, cfg.quant, variables)
    if layout == "containers":
        variables = int8_containers(variables)
    elif layout == "served":
        variables = served_layout(variables, cfg.model, cfg.quant)
    return Served(cfg, model, variables)


# the floats every ratio is taken against: bf16 compute (as the baseline trains) and float32 compute (faster on CPU)
FLOATS = {"float": "bf16", "float_f32": "f32"}


def interleaved_speed(variants, size_overrides, batches, new_tokens: int, rounds: int, say, reps: int = 1) -> dict:
    """Prefill and decode tokens/s of each variant at each batch, variants timed in turn round after round (each
    variant's figures in a round: decode_speed's medians of `reps` timings), and each
    round's ratio to each float of FLOATS among `variants` (both are added when missing, bf16 first). Rows carry
    min/median over rounds of the ratios: `{key}_x_float_{min,median}` against bf16 and `{key}_x_float_f32_...`
    against f32 compute, and `generate_temp_bytes` (see generate_memory: a run-time float copy of the weights shows
    there)."""
    variants = [*FLOATS, *[name for name in variants if name not in FLOATS]]
    runs = {}
    for i, name in enumerate(variants):
        say(f"building {name} ({i + 1}/{len(variants)}) with random weights in its serving layout")
        runs[name] = random_served(name, size_overrides)
    per_round = {(name, b): [] for name in variants for b in batches}
    memory = {}
    for i, (name, b) in enumerate(per_round):
        say(f"compiling generate for {name} b={b} ({i + 1}/{len(per_round)}) for its memory analysis")
        memory[name, b] = generate_memory(runs[name], b, new_tokens, VARIANTS[name][2])
    tic, first_round, size = time.perf_counter(), None, len(per_round)
    for r in range(rounds):
        for i, (name, b) in enumerate(per_round):
            eta = timing_eta(time.perf_counter() - tic, r * size + i, rounds * size, size, first_round)
            say(f"round {r + 1}/{rounds}: timing {name} b={b} ({i + 1}/{size}){eta}")
            per_round[name, b].append(decode_speed(runs[name], b, new_tokens, reps, VARIANTS[name][2]))
        first_round = time.perf_counter() - tic if first_round is None else first_round
        say(f"round {r + 1}/{rounds} done, load average {load_text()}")
    rows = []
    for (name, b), speeds in per_round.items():
        row = {"name": name, "batch": b, "param_bytes": tree_bytes(runs[name].variables)["total"],
               "generate_temp_bytes": memory[name, b]["temp"]}
        text = []
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            resolved = [s[key] for s in speeds if s[key]]
            row[f"{key}_median"] = statistics.median(resolved) if resolved else None  # None: no round resolved it
            row[f"{key}_rounds"] = len(resolved)
            ratios = []
            for base, label in FLOATS.items():
                found = [s[key] / f[key] for s, f in zip(speeds, per_round[base, b]) if s[key] and f[key]]
                row[f"{key}_x_{base}_min"] = min(found) if found else None
                row[f"{key}_x_{base}_median"] = statistics.median(found) if found else None
                ratios.append(f"x{label} {fmt(row[f'{key}_x_{base}_min'])}/{fmt(row[f'{key}_x_{base}_median'])}")
            median = "n/a" if row[f"{key}_median"] is None else f"{row[f'{key}_median']:,.0f}"
            unresolved = len(speeds) - len(resolved)
            note = f" ({unresolved} of {len(speeds)} rounds too short to resolve)" if unresolved else ""
            text.append(f"{key.split('_')[0]} {median} tok/s{note} {' '.join(ratios)}")
        say(f"{name} b={b}: {', '.join(text)}, param bytes {row['param_bytes']:,}, generate's temp bytes "
            f"{row['generate_temp_bytes']:,}")
        rows.append(row)
    return {"overrides": list(size_overrides), "rounds": rounds, "reps": reps, "new_tokens": new_tokens, "rows": rows}


def timing_eta(elapsed: float, done: int, total: int, round_size: int, first_round: float | None) -> str:
    """", ETA m:ss" for the `total - done` timings left after `done` (of rounds of `round_size`) took `elapsed`
    seconds. The first round compiles each variant's prefill and generate, so its pace gives an upper bound ("ETA
    under"); after it (`first_round`: its seconds), the later rounds' pace, or the first's own at the second's start.
    "" before any timing is done."""
    if done == 0:
        return ""
    if first_round is None:
        return f", ETA under {format_duration(elapsed / done * (total - done))} (round 1 compiles)"
    later = done - round_size
    pace = (elapsed - first_round) / later if later else first_round / round_size
    return f", ETA {format_duration(pace * (total - done))}"


def variants_rss(variants, size_overrides, new_tokens: int) -> dict[str, dict]:
    """Peak RSS (see train.bench.common.peak_rss) of a child per variant that builds it with `size_overrides` in its
    serving layout (no float kernel of a quantized layer is ever made) and generates `new_tokens` at batch 1, and
    of a child that only starts the runtime ("runtime")."""
    commands = {"runtime": [sys.executable, "-c", "import jax.numpy as jnp, train.bench.serve_ab; "
                                                  "jnp.zeros(1).block_until_ready()"]}
    for name in variants:
        commands[name] = [sys.executable, "-m", "train.bench.serve_ab", "--rss-child", name, "--new-tokens",
                          str(new_tokens), "--overrides", *size_overrides]
    return peak_rss(commands)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def load_text() -> str:
    """The 1, 5 and 15-minute load averages, as text."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
