"""`python -m quant.report --workdir RUN [--bits N ...] [--kl-windows N]`: per quantized layer, its bits, scales,
clipping, the error of its weights and output and its KL sensitivity (the table of `quant.layer_report`), for a QAT,
float or serving run (a serving run's own stored integers, whichever method made them).
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import dataclasses
import sys
from pathlib import Path

import numpy as np

from checkpoints.manager import tree_bytes
from quant.config import QuantConfig
from quant.folding import input_groups
from quant.layer_report import format_report, layer_report
from quant.lora_merge import merged_float_params
from quant.plan import Path as LayerPath
from quant.plan import path_str
from quant.serving import quantized_weights
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from train.cli import (ArgumentParser, add_scheme_args, int_in, main_guard, positive_int, require_one_process, path_arg,
                       scheme_from_args)
from train.data import eval_batches, eval_rows, load_splits
from train.evaluation import check_batch_fits
from train.memory_check import F32, check_option_fits, forward_bytes
from train.ptq import serving_quant_config
from train.run import load_run


FOLDING_METHODS = ("awq", "awq+gptq", "smoothquant")


def folded_input_scales(model_cfg: ModelConfig, ptq: dict) -> dict[LayerPath, np.ndarray] | None:
    """{layer path: s [in] float64} the serving run's method folded into its layers' inputs (AWQ, SmoothQuant: the
    per-group "scales" its `ptq` metadata records), None for a method that folds nothing (rtn, gptq).
    UserError for a folding run converted before the scales were recorded."""
    if ptq.get("method") not in FOLDING_METHODS:
        return None
    groups, fold = ptq.get("groups") or {}, {}
    for group in input_groups(model_cfg):
        entry = groups.get(path_str(group.layers[0]))
        if entry is None:
            continue
        if "scales" not in entry:
            raise UserError(f"this {ptq['method']} serving run does not record the scales it folded into its layers; "
                            f"convert it again with python -m quant.convert to report on it")
        for layer in group.layers:
            fold[layer] = np.asarray(entry["scales"], np.float64)[group.expand]
    return fold


def folded_output_scales(model_cfg: ModelConfig, ptq: dict) -> dict[LayerPath, np.ndarray] | None:
    """{layer path: s [out] float64} for layers whose output columns a method divided by the next group's input
    scales (v before o, up before down: that group's `source` is this layer's kernel), None when nothing was folded
    so. Same records and errors as `folded_input_scales`."""
    inputs = folded_input_scales(model_cfg, ptq)
    if inputs is None:
        return None
    groups, fold = ptq.get("groups") or {}, {}
    for group in input_groups(model_cfg):
        entry = groups.get(path_str(group.layers[0]))
        if entry is not None and group.source[-1] == "kernel":
            fold[tuple(group.source[:-1])] = np.asarray(entry["scales"], np.float64)
    return fold


def report_workdir(workdir: Path, scheme: QuantConfig | None, batch_size: int, kl_windows: int = 4) -> str:
    """The report table for `workdir`, with the per-layer KL column on `kl_windows` validation windows (spread
    over the split, at most as many as it holds; 0: not measured). A serving run has no float weights left: its
    stored integers and scales, whichever method wrote them, are measured against the float run it was converted
    from, at the step it was converted from (see `quant.layer_report.layer_report`); a merged one (quant.merge)
    against its LoRA run's base + adapters merged in float, the weights the merge re-quantized.
    UserError for a LoRA run, a float run given no scheme, a serving run with no recorded source or given a scheme,
    or a scheme that quantizes no layer (an all-float conversion), and in one line naming the option and a value that
    fits, when `batch_size` or `kl_windows` windows cannot fit in memory (`train.memory_check`). A long KL
    measurement writes progress lines to stderr."""
    run = load_run(workdir, refuse={"lora": "report on the float or QAT run its base was converted from, or merge "
                                            "it first (python -m quant.merge) and report on the merged run"})
    kind, source, stored, fold, fold_out = run.metadata.get("kind"), workdir, None, None, None
    params, what = run.variables["params"], ""
    if kind == "serving":
        converted, merged = run.metadata.get("converted_from"), run.metadata.get("merged_from")
        source = converted or merged
        if not source:
            raise UserError(f"{workdir} is a serving run with no record of the float run it came from; "
                            f"report on that run instead (--workdir RUN --bits N)")
        if scheme is not None:
            raise UserError(f"{workdir} is a serving run: it is reported with the scheme it was converted to; "
                            f"drop --bits and the other scheme flags")
        scheme, stored = run.config.quant, quantized_weights(run.variables.get("aqt", {}))
        fold = folded_input_scales(run.config.model, run.metadata.get("ptq") or {})
        fold_out = folded_output_scales(run.config.model, run.metadata.get("ptq") or {})
        if converted:
            run = load_run(Path(source), run.metadata.get("converted_from_step"))  # the step it was converted from
            params = run.variables["params"]
        else:  # quant.merge's: the LoRA run's base + adapters in float, what it re-quantized, at the merged step
            run = load_run(Path(source), run.step)
            params, what = merged_float_params(run.variables, run.config.finetune.lora_alpha)[0], " merged"
    no_scheme = (f"{workdir} is a float run: report measures it at a scheme you give; add --bits N (e.g. --bits 4) "
                 f"or --scheme ggml_q8_0 or ggml_q4_0")
    quant = dataclasses.replace(serving_quant_config(run.config, scheme, no_scheme), mode="qat")
    splits = load_splits(run.config.data, run.tokenizer)
    model, seq_len = run.config.model, run.config.model.seq_len
    check_batch_fits(run, splits.val, batch_size, "--batch-size", f"reporting on {workdir}")
    if kl_windows:  # the float model's logits of every window are held while each layer's are measured
        held = tree_bytes(run.variables)["total"]
        logits_at = lambda n: F32 * eval_rows(splits.val, n, seq_len) * seq_len * model.vocab_size
        check_option_fits("--kl-windows", kl_windows, lambda n: forward_bytes(model, 1, held + logits_at(n)),
                          f"the per-layer KL of {workdir}")
    tokens, _ = next(eval_batches(splits.val, batch_size, seq_len, 1))
    kl_tokens = next(eval_batches(splits.val, kl_windows, seq_len, 1))[0] if kl_windows else None
    rows = layer_report(model, quant, params, tokens, stored, fold, kl_tokens, fold_out, log=progress_line)
    if not rows:
        raise UserError(f"{workdir}: its scheme quantizes no layer (weights, activations and the embedding table all "
                        f"float), so there is nothing to report; report on a quantized run, or on a float run with "
                        f"--bits N")
    kl = f"; per-layer KL on {kl_tokens.shape[0]}x{seq_len} validation windows" if kl_windows else ""
    return (f"{workdir} (weights of {source}{what}, step {run.step}) on {tokens.shape[0]}x{seq_len} "
            f"validation tokens{kl}\n{format_report(rows)}")


def progress_line(line: str) -> None:
    """A progress line of long work, on stderr so the report on stdout stays as it is."""
    print(f"[{line}]", file=sys.stderr, flush=True)


@main_guard
def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m quant.report",
        description="Per quantized layer: bits, granularity, weight scale range, clipped share, the quantization "
                    "error of its weights and of its output on a batch of validation text, and the KL divergence "
                    "of the model with only that layer quantized from the float model.")
    parser.add_argument("--workdir", type=path_arg, required=True,
                        help="a QAT run, a float run (with --bits), or a serving run converted from one (or merged by "
                             "quant.merge)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences of validation text to measure on")
    parser.add_argument("--kl-windows", type=int_in(0), default=4,
                        help="validation windows for the per-layer KL column (one forward per window and layer; "
                             "0 skips it)")
    add_scheme_args(parser)
    args = parser.parse_args(argv)
    require_one_process("python -m quant.report")
    print(report_workdir(args.workdir, scheme_from_args(args), args.batch_size, args.kl_windows))


if __name__ == "__main__":
    main()
