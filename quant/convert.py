"""`python -m quant.convert --workdir RUN --out DIR [--bits N ...] [--method gptq ...]`: post-training quantization
of a float or QAT run into a serving run whose weights are stored only as int8/int4 values and scales, by
round-to-nearest (default) or a calibrated method, then float vs quantized validation loss (and KL) side by side.
The conversion itself is `train.ptq.convert_workdir`.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse
import dataclasses

from quant.awq import AWQSettings
from quant.gptq import GPTQSettings
from quant.ptq_methods import METHODS, PTQSettings
from slm_jax.errors import UserError
from train.cli import (ArgumentParser, add_scheme_args, main_guard, non_negative_float, non_negative_int, path_arg,
                       positive_int, require_one_process, scheme_from_args)
from train.evaluation import conversion_rows, format_table
from train.ptq import Calibration, convert_workdir


def add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method (default: rtn, round-to-nearest with abs-max scales)")
    group.add_argument("--method", choices=METHODS, default="rtn",
                       help="gptq: GPTQ rounding (Frantar et al. 2022); awq: activation-aware scales folded into "
                            "the previous op (Lin et al. 2023); awq+gptq: both; smoothquant: W8A8 outlier "
                            "migration (Xiao et al. 2022, needs --act-bits)")
    group.add_argument("--calib-batches", type=positive_int,
                       help=f"training-split windows to calibrate on (default {Calibration.batches})")
    group.add_argument("--calib-seq-len", type=positive_int, help="tokens per window (default: the model's seq_len)")
    group.add_argument("--seed", type=non_negative_int, help="which training windows (default 0)")
    group.add_argument("--act-order", action="store_true",
                       help="GPTQ rounds inputs in order of decreasing Hessian diagonal")
    group.add_argument("--damp", type=non_negative_float,
                       help=f"GPTQ damping, a fraction of the Hessian's mean diagonal (default {GPTQSettings.damp})")
    group.add_argument("--no-awq-clip", action="store_true",
                       help="AWQ's scales without its weight-clipping search (awq, awq+gptq)")


def method_from_args(args: argparse.Namespace) -> tuple[Calibration, PTQSettings]:
    """The calibration and settings the method flags ask for; UserError for a flag the method does not use."""
    calibration_flags = (args.calib_batches, args.calib_seq_len, args.seed)
    if args.method == "rtn" and calibration_flags != (None,) * 3:
        raise UserError("--calib-batches, --calib-seq-len and --seed choose calibration text: "
                        "give a calibrated --method (gptq, awq, awq+gptq, smoothquant)")
    if (args.act_order or args.damp is not None) and "gptq" not in args.method:
        raise UserError(f"--act-order and --damp are GPTQ settings: use --method gptq or awq+gptq, "
                        f"not {args.method}")
    if args.no_awq_clip and "awq" not in args.method:
        raise UserError(f"--no-awq-clip is an AWQ setting: use --method awq or awq+gptq, not {args.method}")
    defaults = Calibration()
    calibration = Calibration(args.calib_batches or defaults.batches, args.calib_seq_len,
                              defaults.seed if args.seed is None else args.seed)
    gptq = GPTQSettings(act_order=args.act_order, damp=GPTQSettings.damp if args.damp is None else args.damp)
    return calibration, dataclasses.replace(PTQSettings(), gptq=gptq, awq=AWQSettings(clip=not args.no_awq_clip))


@main_guard
def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m quant.convert",
        description="Post-training quantization: convert a float or QAT run into a serving run whose weights "
                    "are stored only as int8/int4 values and scales.")
    parser.add_argument("--workdir", type=path_arg, required=True, help="the float or QAT run to convert")
    parser.add_argument("--out", type=path_arg, required=True, help="folder for the serving run")
    add_scheme_args(parser)
    add_method_args(parser)
    args = parser.parse_args(argv)
    require_one_process("python -m quant.convert")
    calibration, settings = method_from_args(args)
    convert_workdir(args.workdir, args.out, scheme_from_args(args), method=args.method, calibration=calibration,
                    settings=settings)
    print("evaluating both runs on the validation split (20 batches of 16 windows each) ...", flush=True)
    print(format_table(conversion_rows(args.workdir, args.out, 20, 16)))


if __name__ == "__main__":
    main()
