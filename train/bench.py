"""`python -m train.bench [--quick | --micro] [--out DIR]`: measure speed, quality and serving cost on this machine.

Writes `results.json`, `results.md` (tables) and PNG plots to `runs/bench/<device>[-quick|-micro]/`. Each section
lives in its own module (`bench_speed`, `bench_quality`, `bench_serving`, `bench_report`); this file holds the
three profiles and runs them in order.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import jax

from train.cli import main_guard

ROOT = Path(__file__).resolve().parent.parent
# name -> (label, config, overrides on it): the training set-ups the sections compare
VARIANTS = {
    "fp32": ("fp32", "baseline", ("train.precision=fp32",)),
    "bf16": ("bf16 mixed precision", "baseline", ()),
    "int8_w8a8": ("INT8 QAT w8a8", "int8_qat", ()),
    "int4_w4": ("INT4 QAT w4 (g32)", "int4_qat", ()),
    "int4_w4a8": ("INT4 QAT w4a8 (g32)", "int4_qat", ("quant.act_bits=8",)),
}
SPEED_VARIANTS = tuple(VARIANTS)
ALL_PTQ = ("ptq_int8", "ptq_int4_channel", "ptq_int4_group")
NANOGPT_CPU = ("model.n_layers=4", "model.n_heads=4", "model.d_model=128", "model.seq_len=64", "train.batch_size=12")
MICRO_MODEL = ("model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.seq_len=16", "train.batch_size=4")


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much of each section a run measures. Sizes are (label, overrides on the variant's config)."""

    name: str
    matmul_n: int
    matmul_reps: int
    speed_sizes: tuple[tuple[str, tuple[str, ...]], ...]
    speed_variants: tuple[str, ...]
    speed_warmup: int  # untimed steps after the first call
    speed_rounds: int  # variants are timed in turn, round after round, so load changes hit all of them alike
    speed_steps: int  # timed steps per variant per round
    quality_overrides: tuple[str, ...]  # model size and budget of every quality run ("" = the baseline config's)
    quality_trained: tuple[str, ...]  # variants trained from scratch; the first is the float run
    ptq: tuple[str, ...]  # post-training quantizations of the float run (names in bench_quality.PTQ)
    finetunes: tuple[str, ...]  # QAT variants fine-tuned from the float run
    finetune_steps: int
    eval_batches: int
    eval_batch_size: int
    serve_batches: tuple[int, ...]
    serve_new_tokens: int
    serve_reps: int
    adapt_overrides: tuple[str, ...] = ()  # model size and batch of the fine-tuning section's base and runs
    adapt_base_steps: int = 1000  # the base's training on tragedies + histories
    adapt_steps: int = 300  # each fine-tune's steps on the comedies
    adapt_methods: tuple[str, ...] | None = None  # names in bench_finetune.methods (None: all five)
    rss_models: int | None = None  # how many serving models get a peak-RSS subprocess (None: all)


PROFILES = {
    "full": Profile(
        name="full", matmul_n=2048, matmul_reps=10,
        speed_sizes=(("nanoGPT-cpu", NANOGPT_CPU), ("baseline", ())), speed_variants=SPEED_VARIANTS,
        speed_warmup=3, speed_rounds=6, speed_steps=5,
        quality_overrides=("train.sample_tokens=0",), quality_trained=("bf16", "int8_w8a8", "int4_w4"), ptq=ALL_PTQ,
        finetunes=("int8_w8a8", "int4_w4"), finetune_steps=200, eval_batches=50, eval_batch_size=16,
        serve_batches=(1, 8), serve_new_tokens=256, serve_reps=5, adapt_base_steps=1000, adapt_steps=300),
    "quick": Profile(
        name="quick", matmul_n=2048, matmul_reps=5,
        speed_sizes=(("nanoGPT-cpu", NANOGPT_CPU), ("baseline", ())), speed_variants=SPEED_VARIANTS,
        speed_warmup=1, speed_rounds=3, speed_steps=3,
        quality_overrides=("model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.seq_len=64",
                           "train.batch_size=16", "train.steps=150", "train.warmup_steps=15",
                           "train.learning_rate=3e-3", "train.log_every=10", "train.eval_every=50",
                           "train.eval_batches=10", "train.sample_tokens=0"),
        quality_trained=("bf16", "int8_w8a8", "int4_w4"), ptq=ALL_PTQ, finetunes=("int4_w4",), finetune_steps=50,
        eval_batches=20, eval_batch_size=16, serve_batches=(1, 8), serve_new_tokens=64, serve_reps=3,
        adapt_overrides=("model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.seq_len=64",
                         "train.batch_size=16"), adapt_base_steps=150, adapt_steps=40),
    "micro": Profile(
        name="micro", matmul_n=128, matmul_reps=3, speed_sizes=(("micro", MICRO_MODEL),), speed_variants=("fp32",),
        speed_warmup=1, speed_rounds=1, speed_steps=2,
        quality_overrides=(*MICRO_MODEL, "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
                           "train.eval_every=3", "train.eval_batches=1", "train.sample_tokens=0"),
        quality_trained=("bf16",), ptq=("ptq_int4_group",), finetunes=(), finetune_steps=1, eval_batches=1,
        eval_batch_size=4, serve_batches=(1,), serve_new_tokens=4, serve_reps=1, rss_models=1,
        adapt_overrides=MICRO_MODEL, adapt_base_steps=2, adapt_steps=2, adapt_methods=("float_ft", "int4_lora")),
}


def device_name() -> str:
    """`cpu-2core` on a CPU, else the accelerator's kind as a slug (`nvidia-h100-80gb-hbm3`, `-x8` for eight)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    kind = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
    return kind + (f"-x{jax.device_count()}" if jax.device_count() > 1 else "")


def describe_machine() -> dict:
    device = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"name": device_name(), "platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version(), "load_average_at_start": load and [round(x, 2) for x in load]}


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


class Progress:
    """Progress lines with the time since the bench started."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        seconds = int(self.elapsed())
        print(f"[bench {seconds // 60:>2}:{seconds % 60:02d}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller run: under 5 minutes on a 2-core CPU")
    size.add_argument("--micro", action="store_true", help="seconds: every section once, for tests")
    parser.add_argument("--out", type=Path, help="output folder (default runs/bench/<device>[-quick|-micro])")
    return parser.parse_args(argv)


def bench_command(profile: Profile, out: Path | None) -> str:
    flags = {"full": "", "quick": " --quick", "micro": " --micro"}[profile.name]
    return f"python -m train.bench{flags}" + (f" --out {out}" if out else "")


def run_bench(profile: Profile, out: Path, command: str) -> dict:
    from train import bench_finetune, bench_quality, bench_report, bench_serving, bench_speed

    say = Progress()
    work = out / "runs"  # the bench's own training and serving runs; cleared so every bench starts fresh
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schema": 1, "profile": profile.name, "command": command, "machine": describe_machine(),
               "git": git_revision(), "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "section_s": {}}
    say(f"device {results['machine']['name']} ({results['machine']['device_kind']}), profile {profile.name}, "
        f"writing to {out}")

    def section(key: str, title: str, fn):
        say(f"== {title}")
        tic = time.perf_counter()
        results[key] = fn()
        results["section_s"][key] = round(time.perf_counter() - tic, 1)
        print(bench_report.section_markdown(key, results), flush=True)

    section("matmul", "1. matmul peak", lambda: bench_speed.measure_matmul(profile.matmul_n, profile.matmul_reps,
                                                                           say))
    peak = results["matmul"]["rows"][0]["gflops"] * 1e9
    section("throughput", "2. training throughput", lambda: bench_speed.measure_throughput(
        profile.speed_sizes, [(v, *VARIANTS[v]) for v in profile.speed_variants], profile.speed_warmup,
        profile.speed_rounds, profile.speed_steps, peak, say))
    section("quality", "3. quality", lambda: bench_quality.measure_quality(profile, work / "quality", say))
    section("serving", "4. serving", lambda: bench_serving.measure_serving(
        results["quality"], work / "serving", profile.serve_batches, profile.serve_new_tokens, profile.serve_reps,
        profile.rss_models, say))
    section("finetune", "5. fine-tuning to new text", lambda: bench_finetune.measure_finetune(
        profile, work / "finetune", say))
    results["total_s"] = round(say.elapsed(), 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_at_end"] = load and [round(x, 2) for x in load]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    bench_report.write_report(results, out)
    say(f"done in {results['total_s']:.0f} s: {out / 'results.md'}")
    return results


@main_guard
def main(argv=None):
    args = parse_args(argv)
    profile = PROFILES["quick" if args.quick else "micro" if args.micro else "full"]
    out = args.out or Path("runs") / "bench" / (device_name() + ("" if profile.name == "full" else f"-{profile.name}"))
    return run_bench(profile, out, bench_command(profile, args.out))


if __name__ == "__main__":
    main()
