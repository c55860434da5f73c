"""`python -m quant.convert --workdir RUN --out DIR [--bits N ...]`: post-training quantization of a float or QAT run
into a serving run whose weights are stored only as int8/int4 values and scales, then float vs quantized validation
loss side by side. The conversion itself is `train.ptq.convert_workdir` over `quant.serving.convert`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from train.cli import add_scheme_args, main_guard, scheme_from_args
from train.evaluation import evaluate_workdir, format_table
from train.ptq import convert_workdir


@main_guard
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quant.convert",
        description="Post-training quantization: convert a float or QAT run into a serving run whose weights "
                    "are stored only as int8/int4 values and scales.")
    parser.add_argument("--workdir", type=Path, required=True, help="the float or QAT run to convert")
    parser.add_argument("--out", type=Path, required=True, help="folder for the serving run")
    add_scheme_args(parser)
    args = parser.parse_args(argv)
    convert_workdir(args.workdir, args.out, scheme_from_args(args))
    print(format_table([evaluate_workdir(w, 20, 16) for w in (args.workdir, args.out)]))


if __name__ == "__main__":
    main()
