"""`python -m train.bench.serve_ab --size larger --rss`: float against quantized serving (see VARIANTS), timed in
turn round after round in one process, with per-round ratios (min / median) to both floats, bf16 compute and f32
compute (always timed), and each variant's peak RSS.

Random weights in the serving layout (`train.bench.serve_speed.random_served`); prints one line per variant and
batch, and the load average, since a busy machine widens the ratios' spread; says so when other processes used
the CPU meanwhile (`train.bench.trust`).
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from slm_jax.errors import UserError
from slm_jax.sampling import generate
from train.bench.serve_speed import SIZES, VARIANTS, interleaved_speed, load_text, random_served, variants_rss
from train.bench.trust import SectionLoad, busy_reasons, busy_warning
from train.cli import ArgumentParser, main_guard, positive_int


def rss_child(variant: str, overrides, new_tokens: int) -> None:
    """Build `variant` with random weights in its serving layout and generate `new_tokens` at batch 1."""
    run = random_served(variant, overrides)
    prompt = jnp.zeros((1, max(1, run.config.model.seq_len // 2)), jnp.int32)
    jax.block_until_ready(generate(run.model, run.variables, prompt, jax.random.PRNGKey(0), new_tokens, 0.8, 40,
                                   VARIANTS[variant][2]))


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m train.bench.serve_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="larger")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--reps", type=positive_int, default=3,
                        help="timings of each variant per round (their median is the round's figure; default 3)")
    parser.add_argument("--rss", action="store_true", help="also the peak RSS of each variant, in a child each")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rss-child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        return rss_child(args.rss_child, SIZES[args.size] if args.overrides is None else args.overrides,
                         args.new_tokens)
    if args.new_tokens < 2:
        raise UserError("--new-tokens must be at least 2: decode is timed as generate(n) minus generate(n // 2)")
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        raise UserError(f"--json {args.json}: its folder does not exist or is not writable")
    tic = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - tic:6.0f}s] {text}", flush=True)
    say(f"size {args.size} ({' '.join(SIZES[args.size]) or 'baseline config'}), load average {load_text()}")
    section_load = SectionLoad().start()
    results = {"size": args.size, "speed": interleaved_speed(args.variants, SIZES[args.size], args.batches,
                                                             args.new_tokens, args.rounds, say, args.reps)}
    variants = [row["name"] for row in results["speed"]["rows"] if row["batch"] == args.batches[0]]
    if args.rss:
        say(f"peak RSS: {len(variants) + 1} child processes at once (one per variant and one that only starts the "
            f"runtime), each building its variant and generating {args.new_tokens} tokens")
        results["rss"] = variants_rss(variants, SIZES[args.size], args.new_tokens)
        for name, found in results["rss"].items():
            say(f"peak RSS {name}: {(found.get('peak_rss_bytes') or 0) / 1e6:,.0f} MB")
    results["load_average_end"] = load_text()
    load = section_load.finish()
    results["busy"] = busy_reasons({}, load, os.cpu_count())
    if results["busy"]:
        say(busy_warning(results["busy"], marked=False))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    say(f"done, load average {load_text()}")


if __name__ == "__main__":
    main()
