"""`python -m train.generate --workdir runs/baseline --prompt "ROMEO:"`: sample text with the KV cache.

Works for float, QAT and serving (integer) workdirs alike: the model comes from the checkpoint's own config.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from train.cli import main_guard, non_negative_float, non_negative_int, positive_int
from train.loop import sample_text
from train.run import load_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=40, help="0 = no top-k filtering")
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--step", type=non_negative_int, help="checkpoint step (default: latest)")
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    run = load_run(args.workdir, args.step)
    start = time.perf_counter()
    texts = sample_text(run.model, run.variables, run.tokenizer, args.prompt, args.max_new_tokens,
                        run.config.model.seq_len, seed=args.seed, temperature=args.temperature,
                        top_k=args.top_k or None, batch=args.num_samples)
    seconds = time.perf_counter() - start
    for i, text in enumerate([texts] if isinstance(texts, str) else texts):
        if i:
            print("-" * 40)
        print(args.prompt + text)
    print(f"[{args.num_samples * args.max_new_tokens} tokens in {seconds:.2f}s including compilation, "
          f"step {run.step} of {args.workdir}]")


if __name__ == "__main__":
    main()
