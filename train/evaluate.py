"""`python -m train.evaluate --workdir runs/baseline [--workdir runs/int8_qat ...]`: validation loss,
perplexity and bits per character; several workdirs give a side-by-side table.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse

from train.cli import (ArgumentParser, add_base_argument, main_guard, non_negative_int, path_arg, positive_int,
                       require_one_process)
from train.evaluation import evaluate_workdir, format_table
from train.run import check_base_used


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--workdir", type=path_arg, action="append", required=True, help="repeat to compare runs")
    parser.add_argument("--batches", type=positive_int, default=50, help="validation batches per run")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="windows per validation batch")
    parser.add_argument("--step", type=non_negative_int,
                        help="checkpoint step to evaluate (default: each run's latest), e.g. when the latest is "
                             "damaged")
    add_base_argument(parser)
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    require_one_process("python -m train.evaluate")
    check_base_used(args.base, args.workdir)
    rows = [evaluate_workdir(w, args.batches, args.batch_size, base=args.base, step=args.step) for w in args.workdir]
    print(format_table(rows))


if __name__ == "__main__":
    main()
