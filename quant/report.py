"""`python -m quant.report --workdir RUN [--bits N ...]`: per quantized layer, its bits, scales, clipping and the
error of its weights and output (the table of `quant.layer_report`), for a QAT, float or serving run.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from quant.config import QuantConfig
from quant.layer_report import format_report, layer_report
from slm_jax.errors import UserError
from train.cli import add_scheme_args, main_guard, positive_int, require_one_process, scheme_from_args
from train.data import eval_batches, load_splits
from train.ptq import serving_quant_config
from train.run import load_run


def report_workdir(workdir: Path, scheme: QuantConfig | None, batch_size: int) -> str:
    """The report table for `workdir`. A serving run has no float weights left: it is measured against the run it
    was converted from, with its own scheme. UserError for a LoRA run or a serving run with no recorded source."""
    run = load_run(workdir, refuse={"lora": "report on the float or QAT run its base was converted from, or merge "
                                            "it first (python -m quant.merge) and report on the merged run"})
    kind, source = run.metadata.get("kind"), workdir
    if kind == "serving":
        source = run.metadata.get("converted_from")
        if not source:
            raise UserError(f"{workdir} is a serving run with no record of the float run it came from; "
                            f"report on that run instead (--workdir RUN --bits N)")
        scheme = scheme or run.config.quant
        run = load_run(Path(source))
    quant = dataclasses.replace(serving_quant_config(run.config, scheme), mode="qat")
    splits = load_splits(run.config.data, run.tokenizer)
    tokens, _ = next(eval_batches(splits.val, batch_size, run.config.model.seq_len, 1))
    rows = layer_report(run.config.model, quant, run.variables["params"], tokens)
    return (f"{workdir} (weights of {source}, step {run.step}) on {batch_size}x{run.config.model.seq_len} "
            f"validation tokens\n{format_report(rows)}")


@main_guard
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quant.report",
        description="Per quantized layer: bits, granularity, weight scale range, clipped share, and the "
                    "quantization error of its weights and of its output on a batch of validation text.")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="a QAT run, a float run (with --bits), or a serving run converted from one")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences of validation text to measure on")
    add_scheme_args(parser)
    args = parser.parse_args(argv)
    require_one_process("python -m quant.report")
    print(report_workdir(args.workdir, scheme_from_args(args), args.batch_size))


if __name__ == "__main__":
    main()
