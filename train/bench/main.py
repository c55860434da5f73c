"""`python -m train.bench [--quick | --micro] [--out DIR]`: measure speed, quality and serving cost on this machine.

Writes `results.json`, `results.md` (tables) and PNG plots to `runs/bench/<device>[-quick|-micro]/`. Each section
lives in its own module of this package (`speed`, `torch_reference`, `quality`, `serving`, `finetune`, `ptq`; tables and plots in `report`,
profiles in `profiles`); this file runs them in order and hands the quality runs on to the serving section.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from train.bench import finetune, ptq, quality, report, serving, speed, torch_reference
from train.bench.common import Progress, describe_machine, device_name, git_revision
from train.bench.profiles import PROFILES, Profile
from train.bench.trust import SectionLoad, busy_reasons, busy_warning
from train.cli import ArgumentParser, main_guard, path_arg
from train.cpu_devices import MAX_AUTO_DEVICES, split_cpu_host, usable_cores
from train.sharding import MeshConfig


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller run: about 6 minutes on a 2-core CPU")
    size.add_argument("--micro", action="store_true", help="about a minute: every section once on a tiny model, for tests")
    parser.add_argument("--out", type=path_arg, help="output folder (default runs/bench/<device>[-quick|-micro])")
    return parser.parse_args(argv)


def bench_command(profile: Profile, out: Path | None) -> str:
    flags = {"full": "", "quick": " --quick", "micro": " --micro"}[profile.name]
    return f"python -m train.bench{flags}" + (f" --out {out}" if out else "")


def run_bench(profile: Profile, out: Path, command: str) -> dict:
    """Run every section of `profile`, writing results.json, results.md and plots to `out`; returns the results."""
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
        tic, load = time.perf_counter(), SectionLoad().start()
        results[key] = fn()
        results["section_s"][key] = round(time.perf_counter() - tic, 1)
        results[key]["load"] = load.finish()
        results[key]["busy"] = busy_reasons(results[key].get("spreads", {}), results[key]["load"], os.cpu_count())
        print(report.section_markdown(key, results), flush=True)
        if results[key]["busy"]:
            say(busy_warning(results[key]["busy"]))

    section("matmul", "1. matmul peak", lambda: speed.measure_matmul(profile.matmul_n, profile.matmul_reps, say))
    peak = results["matmul"]["rows"][0]["gflops"] * 1e9
    section("throughput", "2. training throughput", lambda: speed.measure_training_speed(profile, peak, say))
    section("torch", "2b. PyTorch eager reference", lambda: torch_reference.measure_reference(
        profile.reference_overrides, profile.reference_precisions, profile.speed_warmup, profile.reference_rounds,
        profile.reference_steps, say))
    section("quality", "3. quality", lambda: quality.measure_quality(profile, work / "quality", say))
    section("serving", "4. serving", lambda: serving.measure_serving(
        results["quality"], work / "serving", profile.serve_batches, profile.serve_new_tokens, profile.serve_reps,
        profile.rss_models, say, profile.serve_kv_bits, profile.serve_larger))
    section("finetune", "5. fine-tuning to new text", lambda: finetune.measure_finetune(
        profile, work / "finetune", say))
    if profile.ptq_settings:  # minutes of GPTQ on a CPU: the full profile only
        float_dir = Path(results["quality"]["rows"][0]["workdir"])
        section("ptq", "6. calibrated PTQ", lambda: ptq.measure_ptq(profile, float_dir, work / "ptq", say))
    results["total_s"] = round(say.elapsed(), 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_at_end"] = load and [round(x, 2) for x in load]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write_report(results, out)
    say(f"done in {results['total_s']:.0f} s: {out / 'results.md'}")
    return results


@main_guard
def main(argv=None):
    args = parse_args(argv)
    # a CPU split one device per core, as train.main trains on it; each timed step uses the devices its batch allows
    split_cpu_host(MeshConfig(cpu_devices=min(usable_cores(), MAX_AUTO_DEVICES)), 1)
    profile = PROFILES["quick" if args.quick else "micro" if args.micro else "full"]
    out = args.out or Path("runs") / "bench" / (device_name() + ("" if profile.name == "full" else f"-{profile.name}"))
    # absolute: the bench's child processes run in the repository, not where the bench was started
    results = run_bench(profile, out.resolve(), bench_command(profile, args.out))
    failed = failed_measurements(results)
    if failed:
        print(f"error: {len(failed)} bench measurement(s) failed: " + "; ".join(failed), file=sys.stderr, flush=True)
        raise SystemExit(1)
    return results


def failed_measurements(results: dict) -> list[str]:
    """'section/row: error' for every row of every section that records an error (a failed child run)."""
    return [f"{key}/{row.get('name', '?')}: {row['error']}" for key, section in results.items()
            if isinstance(section, dict) for row in section.get("rows", []) if isinstance(row, dict) and row.get("error")]


if __name__ == "__main__":
    main()
