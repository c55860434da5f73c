"""Bench section 5: adapting a model to new text, the float way and the quantized ways.

A float base learns the tragedies and histories; each method then trains the same number of steps on the
comedies and is validated on a held-out comedy: full float fine-tuning, continued INT8 and INT4 QAT, and LoRA over
the base converted to INT8 and INT4 serving weights. Every fine-tune runs as its own `python -m train.main`
process under `/usr/bin/time -v`, so its peak memory is measured along with its step time and its train state; the
step time's spread comes from the run's logging intervals (`interval_step_times`) and feeds `train.bench.trust`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from checkpoints.manager import CheckpointStore, tree_bytes
from quant.config import QuantConfig
from train.bench.common import finish_measured, quiet, start_measured, train_command
from train.bench.trust import spread
from train.config import load_config
from train.data import DataConfig
from train.evaluation import evaluate_workdir
from train.loop import run_training
from train.metrics import read_metrics
from train.ptq import convert_workdir
from train.run import load_run

SOURCE_DATA = ("data.genres=[tragedies,histories]", "data.val_plays=[hamlet]")
TARGET_DATA = ("data.genres=[comedies]", "data.val_plays=[twelfth-night]")
TARGET = DataConfig(genres=("comedies",), val_plays=("twelfth-night",))
# The serving bases LoRA trains over: the same schemes as the int8_qat and int4_qat configs.
BASES = {"int8": QuantConfig(mode="serve", weight_bits=8, act_bits=8, embed_bits=8),
         "int4": QuantConfig(mode="serve", weight_bits=4, granularity="per_group", group_size=32, embed_bits=8,
                             scale_dtype="bfloat16")}


def methods(base: Path, serving: dict[str, Path]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, label, config, overrides) of each fine-tune; the configs carry each method's own learning rate."""
    float_lr = load_config("finetune_int8_qat").train.learning_rate
    return [
        ("float_ft", "full float fine-tuning (bf16)", "baseline",
         (f"train.init_from={base.absolute()}", f"train.learning_rate={float_lr:g}", "train.weight_decay=0.0")),
        ("int8_qat_ft", "continued INT8 QAT (w8a8)", "finetune_int8_qat", (f"train.init_from={base.absolute()}",)),
        ("int4_qat_ft", "continued INT4 QAT (w4 g32)", "int4_qat",
         ("finetune.method=qat", f"train.init_from={base.absolute()}", f"train.learning_rate={float_lr:g}")),
        ("int8_lora", "LoRA over INT8 weights (w8a8)", "finetune_int4_lora",
         (f"finetune.base={serving['int8'].absolute()}",)),
        ("int4_lora", "LoRA over INT4 weights (w4 g32)", "finetune_int4_lora",
         (f"finetune.base={serving['int4'].absolute()}",)),
    ]


def state_bytes(workdir: Path) -> dict:
    """What the run holds while it trains: trainable params, their optimizer state, and the frozen base."""
    store = CheckpointStore(workdir / "checkpoints", create=False)
    try:
        arrays, metadata = store.arrays(), store.metadata()
    finally:
        store.close()
    trainable = sum(a.nbytes for a in arrays if a.path.startswith("params/"))
    optimizer = sum(a.nbytes for a in arrays if a.path.startswith("opt_state/"))
    frozen = 0
    if metadata.get("kind") == "lora":
        frozen = tree_bytes(load_run(Path(metadata["base"]["path"])).variables)["total"]
    return {"trainable_params": sum(int(np.prod(a.shape)) for a in arrays if a.path.startswith("params/")),
            "trainable_bytes": trainable, "optimizer_bytes": optimizer, "frozen_bytes": frozen,
            "state_bytes": trainable + optimizer + frozen}


def interval_step_times(records: list[dict]) -> list[float]:
    """Mean seconds per step over each logging interval of a run trained from step 0, from its metrics.jsonl
    records: each logged `ms_per_step` is the running mean over the steps since the first (which compiles and is
    not timed), so interval k's mean is (mean_k * n_k - mean_{k-1} * n_{k-1}) / (n_k - n_{k-1}), n = step - 1.
    The final summary record repeats the last mean and is skipped. [] when no interval has a timed step."""
    times, timed_before, total_before = [], 0, 0.0
    for record in records:
        if record.get("final") or record.get("ms_per_step") is None:
            continue
        timed_steps = record["step"] - 1
        total = record["ms_per_step"] / 1000 * timed_steps
        if timed_steps > timed_before:
            times.append((total - total_before) / (timed_steps - timed_before))
            timed_before, total_before = timed_steps, total
    return times


def measure_finetune(profile, work: Path, say) -> dict:
    size = [*profile.adapt_overrides, "train.sample_tokens=0"]
    base = work / "base_tragedies_histories"
    base_overrides = [*size, *SOURCE_DATA, f"train.steps={profile.adapt_base_steps}",
                      f"checkpoint.every={profile.adapt_base_steps}"]
    say(f"training the base on tragedies and histories ({profile.adapt_base_steps} steps)")
    run_training(load_config("baseline", base_overrides), base, log=quiet(say))
    serving = {}
    for name, quant in BASES.items():
        serving[name] = work / f"base_{name}"
        convert_workdir(base, serving[name], quant, log=quiet(say))

    steps = profile.adapt_steps
    common = (*size, *TARGET_DATA, f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
              f"train.eval_every={steps}", f"checkpoint.every={steps}", f"train.log_every={max(1, steps // 10)}")
    rows, spreads = [], {}
    for workdir, label in ((base, "base before fine-tuning (float)"),
                           (serving["int4"], "base before fine-tuning (INT4 serving)")):
        rows.append({"name": workdir.name, "label": label, "command": None, **evaluate_on_target(workdir, profile)})
    for name, label, config_name, overrides in methods(base, serving):
        if profile.adapt_methods is not None and name not in profile.adapt_methods:
            continue
        workdir = work / name
        overrides = (*common, *overrides)
        command = train_command(config_name, overrides, workdir)
        say(f"fine-tuning: {label} ({steps} steps)")
        argv = [sys.executable, "-m", "train.main", "--config", config_name, "--workdir", str(workdir.absolute())]
        measured = finish_measured(start_measured(argv + [a for o in overrides for a in ("--set", o)]))
        if measured["exit_code"]:
            error = measured.get("error") or f"exit code {measured['exit_code']}"
            rows.append({"name": name, "label": label, "command": command, "error": error})
            say(f"    failed: {error}")
            continue
        records = read_metrics(workdir / "metrics.jsonl")
        summary = next(r for r in reversed(records) if r.get("final"))
        row = {"name": name, "label": label, "command": command, "steps": steps,
               "ms_per_step_mean": summary.get("ms_per_step"), "wall_s": summary["wall_s"], **measured,
               **state_bytes(workdir), **evaluate_on_target(workdir, profile)}
        intervals = interval_step_times(records)
        if intervals:
            spreads[f"finetune {name} step"] = times = spread(intervals)
            row.update(ms_per_step=1000 * times["median"], ms_per_step_min=1000 * times["min"],
                       ms_per_step_max=1000 * times["max"], timed_intervals=times["n"])
        say(f"    val loss {row['loss']:.4f} | {fmt_ms(row)} ms/step | state {row['state_bytes']:,} B | "
            f"peak RSS {(row['peak_rss_bytes'] or 0) / 1e6:.0f} MB")
        rows.append(row)
    reference = next((r for r in rows if r["name"] == "float_ft" and "loss" in r), None)
    for row in rows:
        if reference and "loss" in row:
            row["loss_vs_float_ft"] = row["loss"] / reference["loss"] - 1
        for key in ("state_bytes", "peak_rss_bytes", "ms_per_step"):
            if reference and row.get(key) and reference.get(key):
                row[f"{key}_vs_float_ft"] = row[key] / reference[key]
    windows = next((r["val_windows"] for r in rows if "val_windows" in r), "no windows (every method failed)")
    return {"how": f"{profile.adapt_base_steps} steps on tragedies + histories, then {steps} steps on the comedies "
                   f"per method; validation loss on twelfth-night over {windows}; state = trainable params + "
                   f"optimizer state + frozen base, from the "
                   f"checkpoint; peak RSS of the whole training process (/usr/bin/time -v); ms/step = median "
                   f"(min..max) of the mean step time of each logging interval of {max(1, steps // 10)} step(s), "
                   f"the first step (compilation) excluded",
            "base_command": train_command("baseline", base_overrides, base), "rows": rows, "spreads": spreads}


def fmt_ms(row: dict) -> str:
    """A fine-tune's ms/step for the console: "median (min..max)", or "—" when no step was timed."""
    if row.get("ms_per_step") is None:
        return "—"
    return f"{row['ms_per_step']:.1f} ({row['ms_per_step_min']:.1f}..{row['ms_per_step_max']:.1f})"


def evaluate_on_target(workdir: Path, profile) -> dict:
    return evaluate_workdir(workdir, profile.eval_batches, profile.eval_batch_size, data=TARGET)
