"""Bench section 3: validation quality of float, QAT, PTQ and QAT-fine-tuned models on the bundled corpus.

Every model is made and measured by the commands users run (`run_training`, `convert_workdir`,
`evaluate_workdir`), and each row records the equivalent command line.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from train.bench.common import quiet, shown, train_command
from train.bench.profiles import VARIANTS, Profile
from train.config import load_config
from train.evaluation import evaluate_workdir, format_bits_per_char
from train.loop import run_training
from train.metrics import read_metrics
from train.ptq import convert_workdir

# name -> (label, config, overrides): post-training quantization of the float run
PTQ = {
    "ptq_int8": ("INT8 PTQ w8a8 (per-channel)", "ptq_int8", ()),
    "ptq_int4_channel": ("INT4 PTQ w4 (per-channel)", "ptq_int4", ("quant.granularity=per_channel",)),
    "ptq_int4_group": ("INT4 PTQ w4 (g32)", "ptq_int4", ()),
}


def loss_curve(workdir: Path) -> dict:
    records = read_metrics(workdir / "metrics.jsonl")
    train = [r for r in records if "loss" in r and not r.get("final")]
    val = [r for r in records if "val_loss" in r]
    return {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
            "val_step": [r["step"] for r in val], "val_loss": [r["val_loss"] for r in val]}


def train_run(name: str, kind: str, variant: str, overrides: list[str], work: Path, say) -> dict:
    label, config_name, extra = VARIANTS[variant]
    overrides = [*overrides, *extra]
    steps = load_config(config_name, overrides).train.steps
    overrides.append(f"checkpoint.every={steps}")  # one save, at the end
    config = load_config(config_name, overrides)
    workdir = work / name
    say(f"training {name} ({label}, {steps} steps)")
    summary = run_training(config, workdir, log=quiet(say))
    return {"name": name, "kind": kind, "label": label if kind == "trained" else f"{label}, from float",
            "config": config_name, "overrides": overrides, "workdir": shown(workdir), "steps": steps,
            "command": train_command(config_name, overrides, workdir), "make_s": summary["wall_s"]}


def ptq_run(name: str, float_dir: Path, work: Path, say) -> dict:
    label, config_name, extra = PTQ[name]
    overrides = [f"train.init_from={shown(float_dir)}", *extra]
    quant = load_config(config_name, overrides).quant
    workdir = work / name
    say(f"converting {shown(float_dir)} -> {name} ({label})")
    tic = time.perf_counter()
    convert_workdir(float_dir, workdir, quant, log=quiet(say))
    return {"name": name, "kind": "ptq", "label": label, "config": config_name, "overrides": overrides,
            "workdir": shown(workdir), "steps": None, "command": train_command(config_name, overrides, workdir),
            "make_s": time.perf_counter() - tic}


def measure_quality(profile: Profile, work: Path, say) -> dict:
    base = list(profile.quality_overrides)
    float_variant = profile.quality_trained[0]
    rows = [train_run(v, "trained", v, base, work, say) for v in profile.quality_trained]
    float_dir = work / float_variant
    rows += [ptq_run(name, float_dir, work, say) for name in profile.ptq]
    learning_rate = load_config("baseline", base).train.learning_rate
    finetune = [*base, f"train.init_from={shown(float_dir)}", f"train.steps={profile.finetune_steps}",
                f"train.warmup_steps={max(1, profile.finetune_steps // 10)}",
                f"train.learning_rate={learning_rate / 4:g}"]
    rows += [train_run(f"finetune_{v}", "finetuned", v, finetune, work, say) for v in profile.finetunes]
    for row in rows:
        tic = time.perf_counter()
        row.update(evaluate_workdir(Path(row["workdir"]), profile.eval_batches, profile.eval_batch_size))
        row["eval_s"] = time.perf_counter() - tic
        row["eval_command"] = (f"python -m train.evaluate --workdir {shlex.quote(row['workdir'])} "
                               f"--batches {profile.eval_batches} --batch-size {profile.eval_batch_size}")
        say(f"{row['name']}: val loss {row['loss']:.4f}, perplexity {row['perplexity']:.2f}, "
            + format_bits_per_char(row["bits_per_char"]))
    reference = rows[0]["loss"]
    for row in rows:
        row["loss_vs_float"] = row["loss"] - reference
    curves = {row["name"]: loss_curve(Path(row["workdir"])) for row in rows if row["kind"] != "ptq"}
    return {"how": f"validation loss over {rows[0]['val_windows']} spread over the held-out plays "
                   f"(train.evaluate); bits/char = loss / ln 2 / chars per token",
            "float_run": float_variant, "rows": rows, "curves": curves}
