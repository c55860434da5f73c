"""Bench section 4: what serving costs for the float, INT8 and INT4 runs of section 3.

Parameter bytes and checkpoint bytes on disk; prefill and KV-cache decode tokens/s (after compilation) at each
batch size, with the KV cache in the compute dtype and in int8; the peak resident memory of `python -m
train.generate` for each run, under `/usr/bin/time -v`; and at a larger size (random weights in each variant's serving
layout, see serve_speed), where weight bytes rather than per-token overhead limit decoding, speeds and peak RSS.
"""
from __future__ import annotations

import shlex
import shutil
import statistics
import sys
from pathlib import Path

import jax

from checkpoints.manager import CheckpointStore, tree_bytes
from quant.provider import resolve_numerics
from slm_jax.errors import UserError
from train.bench.common import folder_bytes, peak_rss, quiet, shown, timed, train_command
from train.bench.serve_speed import decode_speed, interleaved_speed, variants_rss
from train.bench.trust import spread
from train.config import load_config
from train.ptq import convert_workdir
from train.run import load_run, served_run

LARGER_VARIANTS = ("float", "float_f32", "float_kv8", "int8", "int8_w8", "int4", "int4_in_int8", "int4_int",
                   "int4_per_channel_int8")
RUNTIME_ONLY = "import jax.numpy as jnp, train.generate; jnp.zeros(1).block_until_ready()"


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
        served = served_run(run)
        for bits in kv_bits:
            for batch in batches:
                speed = decode_speed(served, batch, new_tokens, reps, bits)
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
        extra["larger"] = interleaved_speed(LARGER_VARIANTS, larger.overrides, larger.batches, larger.new_tokens,
                                            larger.rounds, say)
        say("larger size: peak RSS of each variant (random weights in its serving layout) and of the runtime")
        extra["larger"]["rss"] = variants_rss(LARGER_VARIANTS, larger.overrides, larger.new_tokens)
    return {**extra, "how": f"tokens/s after compilation, median of {reps}; prompt seq_len/2 random tokens; decode "
                   f"{new_tokens} new tokens with the KV cache (slm_jax.sampling.generate), timed as generate(n) "
                   f"minus generate(n // 2) over the n - n // 2 steps between; tokens/s at batch b count the "
                   f"tokens of all b sequences (b x tokens / seconds)", "spreads": spreads,
            "runtime_rss": {**measured["runtime"], "command": f"python -c {shlex.quote(RUNTIME_ONLY)}"},
            "rows": rows}
