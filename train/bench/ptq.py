"""Bench section 6: calibrated post-training quantization (RTN, GPTQ, GPTQ act-order, AWQ, AWQ+GPTQ) and QAT from
the same float parent, in a setting where round-to-nearest loses clearly and in INT4 g32.

The hard setting is INT2 g32: on the bundled model RTN loses under 3% validation loss at INT3 and INT4 (INT3 g32
+1.6%, INT4 g32 +0.2%), too little to tell quantizers apart. Every serving run is made by `python -m quant.convert`
in a child process (wall time, peak RSS) and measured by `evaluate_workdir` plus KL/top-1 against the float parent.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from train.bench.common import finish_measured, quiet, shown, start_measured
from train.bench.profiles import Profile
from train.config import load_config
from train.data import load_splits
from train.evaluation import compare_runs, evaluate_workdir
from train.loop import run_training
from train.run import load_run

# name -> (label, quant.convert scheme flags, QAT config overrides for the same scheme)
SETTINGS = {
    "int2_g32": ("INT2 g32", ("--bits", "2", "--granularity", "per_group", "--group-size", "32"),
                 ("quant.weight_bits=2", "quant.granularity=per_group", "quant.group_size=32")),
    "int4_g32": ("INT4 g32", ("--bits", "4", "--granularity", "per_group", "--group-size", "32"),
                 ("quant.weight_bits=4", "quant.granularity=per_group", "quant.group_size=32")),
}
# name -> (label, quant.convert method flags)
METHODS = {
    "rtn": ("RTN", ()),
    "gptq": ("GPTQ", ("--method", "gptq")),
    "gptq_act_order": ("GPTQ act-order", ("--method", "gptq", "--act-order")),
    "awq": ("AWQ", ("--method", "awq")),
    "awq_gptq": ("AWQ+GPTQ act-order", ("--method", "awq+gptq", "--act-order")),
}


def convert_row(float_dir: Path, out: Path, flags: list[str], say) -> dict:
    """Run `python -m quant.convert` on `float_dir` into `out` as a child: its command, wall time and peak RSS, and
    the seconds spent quantizing (recorded in the serving run's metadata)."""
    command = "python " + shlex.join(["-m", "quant.convert", "--workdir", shown(float_dir), "--out", shown(out),
                                       *flags])
    say(command)
    tic = time.perf_counter()
    measured = finish_measured(start_measured([sys.executable, "-m", "quant.convert", "--workdir",
                                               str(Path(float_dir).resolve()), "--out", str(Path(out).resolve()),
                                               *flags]))
    row = {"workdir": shown(out), "command": command, "convert_wall_s": time.perf_counter() - tic,
           "peak_rss_bytes": measured["peak_rss_bytes"]}
    if measured["exit_code"]:
        return {**row, "error": measured.get("error", f"exit code {measured['exit_code']}")}
    return {**row, "quantize_s": load_run(out).metadata["ptq"]["seconds"]}


def qat_row(float_dir: Path, setting: str, profile: Profile, work: Path, say) -> dict:
    """QAT of the float parent in `setting`'s scheme with the budget of the quality section's QAT fine-tunes
    (profile.finetune_steps at a quarter of the parent's learning rate), converted like the PTQ rows."""
    parent = load_config(str(float_dir / "config.yaml"))
    steps = profile.finetune_steps
    overrides = [f"train.init_from={shown(float_dir)}", f"train.steps={steps}",
                 f"train.warmup_steps={max(1, steps // 10)}", f"train.learning_rate={parent.train.learning_rate / 4:g}",
                 f"checkpoint.every={steps}", "train.sample_tokens=0", "quant.mode=qat", "quant.act_bits=null",
                 "quant.embed_bits=null", "quant.scale_dtype=float32", *SETTINGS[setting][2]]
    workdir = work / f"{setting}_qat"
    say(f"QAT from float, {SETTINGS[setting][0]}, {steps} steps")
    tic = time.perf_counter()
    run_training(load_config(str(float_dir / "config.yaml"), overrides), workdir, log=quiet(say))
    train_s = time.perf_counter() - tic
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    row = convert_row(workdir, work / f"{setting}_qat_serving", [], say)
    return {**row, "train_s": train_s, "train_command": f"python -m train.main --config {shown(float_dir)}/config.yaml "
                                                       f"{sets} --workdir {shown(workdir)}"}


def measure_ptq(profile: Profile, float_dir: Path, work: Path, say) -> dict:
    """One row per (setting, method) and a QAT row per setting: val loss, vs float, KL(float || row) mean and p99,
    top-1 agreement, seconds and peak RSS of the conversion. `float_dir`: the float parent run."""
    float_dir, batches, size = Path(float_dir), profile.eval_batches, profile.eval_batch_size
    parent = load_run(float_dir)
    val = load_splits(parent.config.data, parent.tokenizer).val  # every row is a conversion of the parent
    float_row = evaluate_workdir(float_dir, batches, size)
    calib = ["--calib-batches", str(profile.ptq_calib_batches)]
    rows = []
    for setting in profile.ptq_settings:
        label, scheme, _ = SETTINGS[setting]
        for method, (method_label, flags) in METHODS.items():
            out = work / f"{setting}_{method}"
            row = convert_row(float_dir, out, [*scheme, *flags, *(calib if flags else [])], say)
            rows.append({"setting": label, "method": method_label, **row})
        rows.append({"setting": label, "method": f"QAT from float ({profile.finetune_steps} steps)",
                     **qat_row(float_dir, setting, profile, work, say)})
    for row in rows:
        if "error" in row:
            continue
        serving = {**evaluate_workdir(Path(row["workdir"]), batches, size), "workdir": row["workdir"]}
        row.update(serving, **compare_runs(parent, load_run(Path(row["workdir"])), val, size, batches))  # QAT too
        row["loss_vs_float"] = row["loss"] / float_row["loss"] - 1
        say(f"{row['setting']} {row['method']}: val loss {row['loss']:.4f} ({row['loss_vs_float']:+.2%}), "
            f"KL {row['kl_mean']:.4f}, top-1 {row['top1']:.1%}")
    return {"how": f"validation loss over {batches} batches of {size} windows (train.evaluate); KL(float || "
                   f"quantized) in nats per token and top-1 agreement with the float parent on the same windows; "
                   f"calibration {profile.ptq_calib_batches} training windows of the model's seq_len (seed 0); "
                   f"quantize s: the method alone, wall s: the whole quant.convert command (load, quantize, save, "
                   f"its own 20-batch evaluation), peak RSS of that command",
            "float_run": shown(float_dir), "float_loss": float_row["loss"], "rows": rows}

