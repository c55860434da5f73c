"""Bench section 4: what serving costs for the float, INT8 and INT4 runs of section 3.

Parameter bytes and checkpoint bytes on disk; prefill and KV-cache decode tokens/s (after compilation) at each
batch size, with the KV cache in the compute dtype and in int8; the peak resident memory of `python -m
train.generate` for each run, under `/usr/bin/time -v`; and decode at a larger size (random weights, converted in
process), where weight bytes rather than per-token overhead limit decoding.
"""
from __future__ import annotations

import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.manager import CheckpointStore, tree_bytes
from quant.provider import resolve_numerics
from quant.serving import convert
from slm_jax.attention import KVCache
from slm_jax.errors import UserError
from slm_jax.sampling import cache_size, generate
from train.bench.common import folder_bytes, peak_rss, quiet, shown, timed, train_command
from train.bench.trust import spread
from train.build import build_model
from train.config import load_config
from train.ptq import convert_workdir
from train.run import load_run

RUNTIME_ONLY = "import jax.numpy as jnp, train.generate; jnp.zeros(1).block_until_ready()"


def decode_speed(run, batch: int, new_tokens: int, reps: int, kv_bits: int | None = None) -> dict:
    """Prefill of a seq_len/2 prompt, timed alone, and `generate` (prefill + new_tokens decode steps, sampling
    at temperature 0.8, top-k 40 as train.generate does), with an int8 KV cache when kv_bits is 8. Decode seconds =
    generate with `new_tokens` minus the same generate with none (the prompt's prefill and first sample), medians
    of `reps` runs after compilation (`time.perf_counter`); decode tokens/s = batch * new_tokens / decode seconds,
    None when load made the difference not positive (too few new tokens to resolve), never a clamped rate."""
    model, variables, cfg = run.model, run.variables, run.config.model
    prompt_len = max(1, cfg.seq_len // 2)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    prefill = jax.jit(lambda v, p: model.apply(v, p, cache=KVCache.init(cfg, p.shape[0], model.dtype, bits=kv_bits)))
    rng = jax.random.PRNGKey(0)
    run_prefill = lambda: prefill(variables, prompt)
    run_generate = lambda n: lambda: generate(model, variables, prompt, rng, n, 0.8, 40, kv_bits)
    first_prefill, first_generate, _ = timed(run_prefill), timed(run_generate(new_tokens)), timed(run_generate(0))
    prefills = spread(timed(run_prefill) for _ in range(reps))
    generates = spread(timed(run_generate(new_tokens)) for _ in range(reps))
    prefill_s, generate_s = prefills["median"], generates["median"]
    decode_s = generate_s - spread(timed(run_generate(0)) for _ in range(reps))["median"]
    decode_s = decode_s if decode_s > 0 else None
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, model.dtype, cache_size(model, prompt_len, new_tokens),
                                                kv_bits))
    return {"batch": batch, "kv_bits": kv_bits, "kv_cache_bytes": cache.nbytes(), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "first_prefill_s": first_prefill, "first_generate_s": first_generate,
            "prefill_s": prefill_s, "generate_s": generate_s, "prefill_spread": prefills, "generate_spread": generates,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": decode_s and batch * new_tokens / decode_s,
            "decode_ms_per_token": decode_s and 1000 * decode_s / new_tokens}


def larger_size_speed(overrides, batches, new_tokens: int, rounds: int, say) -> dict:
    """Prefill and decode tokens/s of float, INT8 (ptq_int8) and INT4 (ptq_int4) serving at a larger model size
    (`overrides` on the baseline config), from one random float init converted in process; the variants are timed
    in turn, round after round, and each round's ratio to float is kept (load hits all variants alike)."""
    configs = {"float": load_config("baseline", overrides), "int8": load_config("ptq_int8", overrides),
               "int4": load_config("ptq_int4", overrides)}
    float_model = build_model(configs["float"], "none")
    params = nn.unbox(float_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    runs = {name: _Run(cfg, build_model(cfg), {"params": params} if name == "float" else
                       convert(cfg.model, cfg.quant, params)) for name, cfg in configs.items()}
    per_round = {(name, b): [] for name in runs for b in batches}
    for _ in range(rounds):
        for name, b in per_round:
            per_round[name, b].append(decode_speed(runs[name], b, new_tokens, 1))
    rows = []
    for (name, b), speeds in per_round.items():
        floats = per_round["float", b]
        ratio = lambda key: [s[key] / f[key] for s, f in zip(speeds, floats) if s[key] and f[key]]
        row = {"name": name, "batch": b, "param_bytes": tree_bytes(runs[name].variables)["total"],
               **{f"{key}_median": statistics.median([s[key] for s in speeds if s[key]] or [0])
                  for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}}
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            found = ratio(key)
            row[f"{key}_x_float_min"], row[f"{key}_x_float_median"] = (min(found), statistics.median(found)) \
                if found else (None, None)
        say(f"larger size {name} b={b}: prefill {row['prefill_tokens_per_s_median']:,.0f} tok/s, decode "
            f"{row['decode_tokens_per_s_median']:,.0f} tok/s, decode x float min/median "
            f"{row['decode_tokens_per_s_x_float_min']}/{row['decode_tokens_per_s_x_float_median']}")
        rows.append(row)
    return {"overrides": list(overrides), "rounds": rounds, "new_tokens": new_tokens, "rows": rows}


def save_restore_times(variables, folder: Path, reps: int) -> dict:
    """Seconds to save `variables` as a checkpoint (synchronously) and to restore it, median of `reps`."""
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    saves, restores = [], []
    for rep in range(max(reps, 2)):  # the first save and restore include Orbax's own start-up
        store = CheckpointStore(folder, keep=1, async_save=False)
        try:
            saves.append(timed(lambda: store.save(rep, variables, {"format_version": 2, "kind": "bench"})))
            restores.append(timed(lambda: jax.block_until_ready(store.restore(template, rep))))
        finally:
            store.close()
    shutil.rmtree(folder, ignore_errors=True)
    return {"save_s": statistics.median(saves[1:]), "restore_s": statistics.median(restores[1:]),
            "save_spread": spread(saves[1:]), "restore_spread": spread(restores[1:])}


class _Run(NamedTuple):
    """What decode_speed reads of a run: its config, model and variables."""

    config: object
    model: object
    variables: dict


def measure_serving(quality: dict, work: Path, batches, new_tokens: int, reps: int, rss_models: int | None,
                    say, kv_bits=(None,), larger=None) -> dict:
    by_name = {row["name"]: row for row in quality["rows"]}
    float_row = by_name[quality["float_run"]]
    models = [("float", f"float: the {float_row['label']} training run (checkpoint holds params + AdamW state)",
               float_row)]
    models += [(name, by_name[ptq]["label"], by_name[ptq]) for name, ptq in (("int8", "ptq_int8"),
                                                                          ("int4", "ptq_int4_group"))
               if ptq in by_name]
    rows = []
    for name, label, source in models:
        run = load_run(Path(source["workdir"]))
        row = {"name": name, "label": label, "workdir": source["workdir"], "made_by": source["command"],
               "param_bytes": tree_bytes(run.variables)["total"],
               "checkpoint_bytes": folder_bytes(Path(source["workdir"]) / "checkpoints" / str(run.step)),
               "compute_dtype": run.config.train.precision, "quant": run.config.quant.mode,
               "numerics": None if run.config.quant.mode == "none" else resolve_numerics(run.config.quant.numerics),
               "speed": []}
        params_only = {"params": run.variables["params"]} if name == "float" else run.variables
        row.update(save_restore_times(params_only, work / f"save_{name}", reps))
        say(f"{name}: save {row['save_s']:.3f} s, restore {row['restore_s']:.3f} s ({tree_bytes(params_only)['total']:,}"
            f" bytes)")
        for bits in kv_bits:
            for batch in batches:
                speed = decode_speed(run, batch, new_tokens, reps, bits)
                say(f"{name} batch {batch} KV cache {'int8' if bits else 'float'}: prefill "
                    f"{speed['prefill_tokens_per_s']:,.0f} tok/s, decode {speed['decode_tokens_per_s'] or 0:,.0f} "
                    f"tok/s, all {batch} sequences counted, cache {speed['kv_cache_bytes']:,} bytes")
                row["speed"].append(speed)
        rows.append(row)

    # The float model with nothing but its params, for the on-disk comparison the int runs are held to.
    overrides = [f"train.init_from={float_row['workdir']}", "quant.weight_bits=null", "quant.act_bits=null",
                 "quant.embed_bits=null"]
    params_only = work / "float_params"
    row = {"name": "float_params", "label": "float, params only (PTQ with every quant bits null)",
           "workdir": shown(params_only), "made_by": train_command("ptq_int8", overrides, params_only)}
    try:
        convert_workdir(Path(float_row["workdir"]), params_only, load_config("ptq_int8", overrides).quant,
                        log=quiet(say))
        store_step = max(int(p.name) for p in (params_only / "checkpoints").iterdir() if p.name.isdigit())
        row["checkpoint_bytes"] = folder_bytes(params_only / "checkpoints" / str(store_step))
        row["param_bytes"] = tree_bytes(load_run(params_only).variables)["total"]  # equal to the float run's
    except UserError as err:
        row["error"] = str(err)
    rows.insert(1, row)

    reference = row.get("checkpoint_bytes") or rows[0]["checkpoint_bytes"]
    for r in rows:
        if "checkpoint_bytes" in r:
            r["checkpoint_vs_float_params"] = r["checkpoint_bytes"] / reference
            r["params_vs_float"] = r["param_bytes"] / rows[0]["param_bytes"]

    measured_models = [r for r in rows if "speed" in r][:rss_models]
    say(f"peak RSS of train.generate for {len(measured_models)} run(s) and of the runtime alone")
    commands = {"runtime": [sys.executable, "-c", RUNTIME_ONLY]}
    for r in measured_models:
        commands[r["name"]] = [sys.executable, "-m", "train.generate", "--workdir",
                               str(Path(r["workdir"]).absolute()), "--max-new-tokens", str(new_tokens)]
    measured = peak_rss(commands)
    for r in rows:
        if r["name"] in measured:
            r.update(measured[r["name"]])
            r["rss_command"] = (f"/usr/bin/time -v python -m train.generate --workdir {shlex.quote(r['workdir'])} "
                                f"--max-new-tokens {new_tokens}")
    spreads = {f"{r['name']} {kind}": r[f"{kind}_spread"] for r in rows for kind in ("save", "restore")
               if f"{kind}_spread" in r}
    spreads.update({f"{r['name']} b={s['batch']} kv={s['kv_bits'] or 'float'} {kind}": s[f"{kind}_spread"]
                    for r in rows for s in r.get("speed", []) for kind in ("prefill", "generate")})
    extra = {}
    if larger is not None:
        say(f"larger size: {' '.join(larger.overrides)}")
        extra["larger"] = larger_size_speed(larger.overrides, larger.batches, larger.new_tokens, larger.rounds, say)
    return {**extra, "how": f"tokens/s after compilation, median of {reps}; prompt seq_len/2 random tokens; decode "
                   f"{new_tokens} new tokens with the KV cache (slm_jax.sampling.generate), timed as generate(n) "
                   f"minus generate(0); tokens/s at batch b count the tokens of all b sequences (b x tokens / "
                   f"seconds)", "spreads": spreads,
            "runtime_rss": {**measured["runtime"], "command": f"python -c {shlex.quote(RUNTIME_ONLY)}"},
            "rows": rows}
