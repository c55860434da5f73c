"""Bench sections 1 and 2: the machine's matmul peak, and training-step speed of each precision and QAT variant,
and of LoRA over an INT4 serving base.

Steps are timed one by one (`block_until_ready`) and reported as medians with their spread (min/max, also in
`spreads` for `train.bench.trust`); variants take turns, round after round, so a change of load on a shared machine
slows all of them alike.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from quant.serving import convert
from train.bench.common import fixed_batch, placed_step, timed_steps
from train.bench.floor import measure_floor, square_matmul_seconds
from train.bench.profiles import LORA_VARIANTS, ONE_DEVICE_VARIANTS, VARIANTS
from train.bench.trust import spread
from train.build import build_model, state_initializer
from train.config import load_config
from train.lora_run import lora_initializer

FLOPS_FORMULA = ("6*N + 12*n_layers*seq_len*d_model per token (PaLM, Chowdhery et al. 2022, app. B): N = parameters "
                 "of every matmul weight (q, k, v, o, gate, up, down and the LM head, which is the embedding table "
                 "when tied; not an untied embedding table or norms), the second term QK^T and attention x V over "
                 "the full seq_len x seq_len scores; forward + "
                 "backward = 3 x forward. QAT's quantize/dequantize work is not counted, and a LoRA step counts its "
                 "base's FLOPs as a full training step does, so MFU ratios are speed ratios.")


def measure_matmul(n: int, reps: int, say) -> dict:
    """GFLOP/s of a jitted [n, n] @ [n, n] matmul in float32 and bfloat16 (median and best of `reps`)."""
    rows, spreads = [], {}
    for dtype in (jnp.float32, jnp.bfloat16):
        first, seconds = square_matmul_seconds(n, dtype, reps)
        flops = 2 * n ** 3
        row = {"dtype": jnp.dtype(dtype).name, "n": n, "reps": reps, "first_call_s": first,
               "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
               "gflops": flops / statistics.median(seconds) / 1e9, "best_gflops": flops / min(seconds) / 1e9,
               "worst_gflops": flops / max(seconds) / 1e9}
        say(f"matmul {row['dtype']} {n}^3: {row['gflops']:.1f} GFLOP/s (median of {reps}; "
            f"{row['worst_gflops']:.1f}..{row['best_gflops']:.1f})")
        rows.append(row)
        spreads[f"matmul {row['dtype']}"] = spread(seconds)
    return {"how": f"jax.jit(jnp.matmul) of two random [n, n] arrays, one untimed call, then {reps} timed; 2*n^3 "
                   "FLOPs per call; the float32 median is the peak MFU is measured against", "rows": rows,
            "spreads": spreads}


def matmul_params(params, model) -> int:
    """Parameters of the matmul weights: every `kernel` leaf (the Linear layers, an untied LM head included) and, when
    `model` (a ModelConfig) ties its embeddings, the embedding table as the LM head's weight: the logits are still one
    [tokens, d_model] x [d_model, vocab] matmul (and two more backward), which the kernels alone left out."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in leaves if getattr(path[-1], "key", None) == "kernel")
    return kernels + (model.vocab_size * model.d_model if model.tie_embeddings else 0)


def flops_per_token(config, n_matmul: int) -> int:
    m = config.model
    return 6 * n_matmul + 12 * m.n_layers * m.seq_len * m.d_model


def lora_state(config, model, float_params):
    """A LoRA variant's initial TrainState: fresh adapters (`lora_initializer`) over `float_params` converted in
    process to `config.quant`'s serving weights, which the state holds frozen as a LoRA run's does."""
    if config.quant.mode != "serve":
        raise ValueError(f"a LoRA speed variant needs quant.mode=serve, got {config.quant.mode}")
    frozen = convert(config.model, config.quant, float_params)
    return jax.jit(lora_initializer(config, model))().replace(frozen=frozen)


def measure_throughput(sizes, variants, warmup: int, rounds: int, steps: int, peak_flops: float, say,
                       floor: bool = False) -> dict:
    """sizes: [(label, overrides)]; variants: [(name, label, config name, overrides)] -> one row per pair.

    Each variant is `load_config` + `build_model` + its step as `train.main` runs it (`placed_step`: on a CPU split
    into one device per core, data-parallel over them) on a fixed batch. The initial state comes from
    `state_initializer` once per size (the first variant's, which must not be LoRA): quantization is a configuration
    of the same model, so every variant starts from the same parameters; a LoRA variant (finetune.method=lora)
    trains adapters over those parameters converted to its serving scheme.
    Rows hold `params` (trained) and `frozen_params`; FLOPs count the model's matmul weights either way.
    With `floor`, each size's matmuls are also timed alone (train.bench.floor, after its steps, with the first
    variant's model): `floors` gives their time, the MFU ceiling it sets and its share of each variant's step.
    """
    rows, spreads, floors = [], {}, []
    for size_label, size_overrides in sizes:
        built, init = [], None
        for name, label, config_name, extra in variants:
            overrides = [*size_overrides, *extra]
            config = load_config(config_name, overrides)
            model = build_model(config)
            if config.finetune.method == "lora":
                if init is None:
                    raise ValueError(f"LoRA variant {name} cannot come first: it adapts the first variant's init")
                float_params = init().params
                n_matmul = matmul_params(float_params, config.model)
                state = lora_state(config, model, float_params)
                del float_params
            else:
                if init is None:
                    init = jax.jit(state_initializer(config, model))
                state = init()
                n_matmul = matmul_params(state.params, config.model)
            step, state, batch, devices = placed_step(config, model, state, fixed_batch(config))
            tic = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            first = time.perf_counter() - tic
            for _ in range(warmup):
                state, metrics = step(state, batch)
            jax.block_until_ready(state)
            say(f"{size_label} {name}: first call (trace + compile + 1 step) {first:.1f} s")
            built.append({"state": state, "step": step, "batch": batch, "times": [], "model": config.model, "row": {
                "size": size_label, "variant": name, "label": label, "config": config_name,
                "overrides": overrides, "size_overrides": list(size_overrides), "variant_overrides": list(extra),
                "batch_size": config.train.batch_size, "seq_len": config.model.seq_len, "devices": devices,
                "params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params))),
                "frozen_params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.frozen))),
                "matmul_params": n_matmul, "flops_per_token": flops_per_token(config, n_matmul),
                "first_call_s": first}})
        for _ in range(rounds):
            for item in built:
                item["state"], seconds = timed_steps(item["step"], item["state"], item["batch"], steps)
                item["times"] += seconds
        floor_of = built[0]["row"]
        if floor:
            floors.append({"size": size_label, **measure_floor(built[0]["model"], floor_of["batch_size"],
                                                                rounds * steps)})
            spreads[f"{size_label} matmul floor"] = floors[-1].pop("spread")
        for item in built:
            row, times = item["row"], item["times"]
            step_s = statistics.median(times)
            tokens = row["batch_size"] * row["seq_len"]
            spreads[f"{size_label} {row['variant']} step"] = spread(times)
            row.update(timed_steps=len(times), ms_per_step=1000 * step_s, ms_per_step_min=1000 * min(times),
                       ms_per_step_max=1000 * max(times), tokens_per_s=tokens / step_s,
                       model_tflops=row["flops_per_token"] * tokens / step_s / 1e12,
                       mfu=row["flops_per_token"] * tokens / step_s / peak_flops)
            rows.append(row)
        reference = {r["variant"]: r["ms_per_step"] for r in rows if r["size"] == size_label}
        for row in rows:
            if row["size"] == size_label:
                for base in ("bf16", "fp32"):
                    if base in reference:
                        row[f"vs_{base}"] = row["ms_per_step"] / reference[base]
        for row in (r for r in rows if r["size"] == size_label):
            say(f"{size_label} {row['variant']}: {row['ms_per_step']:.1f} ms/step ({row['ms_per_step_min']:.1f}.."
                f"{row['ms_per_step_max']:.1f}), {row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%")
        if floor:
            fl = floors[-1]
            step_flops = floor_of["flops_per_token"] * floor_of["batch_size"] * floor_of["seq_len"]
            fl.update(model_flops=step_flops, mfu_ceiling=step_flops / fl["median_s"] / peak_flops,
                      share={r["variant"]: fl["median_s"] * 1000 / r["ms_per_step"] for r in rows
                             if r["size"] == size_label})
            say(f"{size_label}: the step's {fl['matmuls']} matmuls alone {1000 * fl['median_s']:.1f} ms "
                f"({fl['gflops']:.0f} GFLOP/s): MFU ceiling {100 * fl['mfu_ceiling']:.0f}%")
        del built
    return {"how": f"median of {rounds} x {steps} timed steps per variant (variants in turn each round) after "
                   f"{warmup} untimed step(s); fixed random batch; MFU = model FLOP/s / float32 matmul peak",
            "flops_formula": FLOPS_FORMULA, "peak_gflops": peak_flops / 1e9, "rows": rows, "spreads": spreads,
            "floors": floors}


def measure_training_speed(profile, peak_flops: float, say) -> dict:
    """Section 2: `measure_throughput` over the profile's sizes and variants, then over its real-sized model
    (`profile.speed_real`, its own variants and step counts) when it has one; rows and spreads of both."""
    def variants(names):
        return [(v, *({**VARIANTS, **LORA_VARIANTS, **ONE_DEVICE_VARIANTS}[v])) for v in names]

    split = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
    names = (*profile.speed_variants, *(v for v in ONE_DEVICE_VARIANTS if split and v.split("_")[0] in
                                         profile.speed_variants))
    result = measure_throughput(profile.speed_sizes, variants(names), profile.speed_warmup,
                                profile.speed_rounds, profile.speed_steps, peak_flops, say, floor=True)
    real = profile.speed_real
    if real is not None:
        extra = measure_throughput([(real.label, real.overrides)], variants(real.variants), real.warmup,
                                   real.rounds, real.steps, peak_flops, say)
        result["rows"] += extra["rows"]
        result["spreads"].update(extra["spreads"])
        result["how"] += (f"; {real.label}: median of {real.rounds} x {real.steps} timed steps after {real.warmup} "
                          f"untimed, random weights")
    return result
