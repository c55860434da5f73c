"""`python -m train.generate --workdir runs/baseline --prompt "ROMEO:"`: sample text with the KV cache.

Works for float, QAT and serving (integer) workdirs alike: the model comes from the checkpoint's own config.
`--kv-bits 8` keeps the KV cache as int8 and `--kv-bits none` in the compute dtype (default: the run's
quant.kv_bits); `--verbose` prints its bytes. On CPU, int4 codes are served from int8 containers; `--numerics int`
(default: the run's quant.numerics) serves integer matmuls, and `--per-channel-int8` with it re-quantizes weight-only
per-group layers to int8 per channel at load (quant.serving.served_layout); `--precision` picks the compute dtype
(fp32 is the faster on CPU).
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from quant.plan import describe_scheme, make_plan
from quant.serving import per_channel_int8_layers
from slm_jax.attention import KVCache, serving_cache_dtype
from slm_jax.errors import UserError
from slm_jax.sampling import cache_size
from train.cli import (ArgumentParser, add_base_argument, main_guard, non_negative_float, non_negative_int, path_arg,
                       positive_int, require_one_process)
from train.config import PRECISIONS
from train.loop import sample_text
from train.memory_check import check_fits, generation_bytes
from train.metrics import format_duration
from train.run import article, check_base_used, load_run, run_kind, served_run

PROGRESS_EVERY_S = 5.0
KV_CACHES = {"8": 8, "none": None}  # --kv-bits -> the KV cache's bits (None: the compute dtype)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.generate", description=__doc__)
    parser.add_argument("--workdir", type=path_arg, required=True, help="the run to sample from (any kind)")
    parser.add_argument("--prompt", default="ROMEO:", help="text to continue (its tokenizer's special tokens added)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to sample after the prompt")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=40, help="0 = no top-k filtering")
    parser.add_argument("--num-samples", type=positive_int, default=1, help="continuations, sampled as one batch")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    parser.add_argument("--step", type=non_negative_int, help="checkpoint step (default: latest)")
    parser.add_argument("--kv-bits", type=str.lower, choices=tuple(KV_CACHES),
                        help="8: an int8 KV cache; none: one in the compute dtype, also for a run whose config sets "
                             "quant.kv_bits: 8 (default: the run's quant.kv_bits)")
    parser.add_argument("--numerics", choices=("auto", "int", "fake"),
                        help="integer (int) or dequantized (fake) matmuls for a quantized run (default: the run's "
                             "quant.numerics; auto = fake on CPU, int elsewhere)")
    parser.add_argument("--per-channel-int8", action="store_true",
                        help="serving runs, with --numerics int on CPU: serve weight-only per-group (INT4) layers "
                             "re-quantized to int8 per channel (faster decode; each weight within 1/254 of its "
                             "column's abs-max, not the exact codes; quant.serve_per_channel_int8)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="compute dtype while serving (default: the run's train.precision); on CPU fp32 is "
                             "faster than bf16 for float and quantized runs alike")
    parser.add_argument("--verbose", action="store_true", help="print the KV cache's size and bytes")
    add_base_argument(parser)
    return parser.parse_args(argv)


class Progress:
    """A progress line on stderr at most every PROGRESS_EVERY_S seconds while tokens remain: "[generated 640/5,000
    tokens per sample, 812 tok/s, about 0:05 left]" (tok/s over all samples since the start, compilation
    included, so the estimate errs long)."""

    def __init__(self, total: int, samples: int):
        self.total, self.samples = total, samples
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if done >= self.total or now - self.last < PROGRESS_EVERY_S:
            return
        self.last, rate = now, done / (now - self.start)
        print(f"[generated {done:,}/{self.total:,} tokens per sample, {rate * self.samples:,.0f} tok/s, about "
              f"{format_duration((self.total - done) / rate)} left]", file=sys.stderr, flush=True)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    require_one_process("python -m train.generate")
    check_base_used(args.base, [args.workdir])
    run = load_run(args.workdir, args.step, base=args.base)
    kind = run_kind(run.metadata)
    an = article(kind)
    if args.per_channel_int8 and "aqt" not in run.variables:
        raise UserError(f"--per-channel-int8 re-quantizes the integer (INT4) layers a serving run stores; "
                        f"{args.workdir} is {an} {kind} run, which has no integer layers (convert it first: "
                        f"python -m quant.convert)")
    if args.per_channel_int8 and not per_channel_int8_layers(make_plan(run.config.model, run.config.quant)):
        raise UserError(f"--per-channel-int8 re-quantizes a serving run's weight-only per-group (INT4) layers; "
                        f"{args.workdir} has none ({describe_scheme(run.config.model, run.config.quant)}), so it "
                        f"would change nothing")
    if args.numerics and run.config.quant.mode == "none":
        raise UserError(f"--numerics chooses how quantized layers compute; {args.workdir} is {an} {kind} run "
                        f"with no quantized layer (convert it first: python -m quant.convert)")
    run = served_run(run, args.precision, numerics=args.numerics,
                     serve_per_channel_int8=args.per_channel_int8 or None)
    kv_bits = run.config.quant.kv_bits if args.kv_bits is None else KV_CACHES[args.kv_bits]
    context = run.config.model.context  # its attention window: an imported model's beyond its training window
    prompt_len = len(run.tokenizer.encode(args.prompt, add_special_tokens=True, source="--prompt"))
    if prompt_len > context:
        print(f"[prompt: {prompt_len} tokens; the model sees its last {context} (its context)]")
    seen = min(prompt_len or 1, context)  # prompt tokens the model reads
    size = cache_size(run.model, seen, args.max_new_tokens)
    dtype = serving_cache_dtype(run.model.dtype)
    cache = jax.eval_shape(lambda: KVCache.init(run.config.model, args.num_samples, dtype, size, kv_bits))
    check_fits(generation_bytes(run.config.model, args.num_samples, cache.nbytes(), seen, args.max_new_tokens,
                                size),
               f"generating {args.num_samples} sample(s) of {args.max_new_tokens} tokens")
    if args.verbose:
        held = f"int8 with {jnp.dtype(dtype).name} scales" if kv_bits else jnp.dtype(dtype).name
        print(f"[KV cache: {held} (compute {jnp.dtype(run.model.dtype).name}), {size} slots x "
              f"{args.num_samples} sample(s), {cache.nbytes():,} bytes]")
    start, chunks = time.perf_counter(), []
    try:
        texts = sample_text(run.model, run.variables, run.tokenizer, args.prompt, args.max_new_tokens,
                            context, seed=args.seed, temperature=args.temperature, top_k=args.top_k or None,
                            batch=args.num_samples, kv_bits=kv_bits, chunks=chunks,
                            progress=Progress(args.max_new_tokens, args.num_samples))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the text so far is still the user's, then exit 130 / 143
        done = sum(chunk.shape[1] for chunk in chunks)
        if done:
            print_samples(args.prompt, [run.tokenizer.decode(row) for row in np.concatenate(chunks, axis=1)])
            print(f"[stopped after {done:,} of {args.max_new_tokens:,} tokens per sample]", flush=True)
        raise
    seconds = time.perf_counter() - start
    print_samples(args.prompt, [texts] if isinstance(texts, str) else texts)
    print(f"[{args.num_samples * args.max_new_tokens} tokens in {seconds:.2f}s including compilation, "
          f"step {run.step} of {args.workdir}]")


def print_samples(prompt: str, texts: list[str]) -> None:
    """Each sample after its prompt, samples parted by a line of dashes."""
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(prompt + text)


if __name__ == "__main__":
    main()
