"""Post-training quantization of a finished run: load it, convert its weights to integers with AQT
(`quant.serving.convert`), and save them as a serving run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from checkpoints.manager import tree_bytes
from quant.config import QuantConfig
from quant.plan import describe_scheme
from quant.serving import convert
from slm_jax.errors import UserError
from train.config import Config
from train.data import get_batch, load_splits
from train.run import load_run, new_run_folder, write_serving_run

REFUSED = {"serving": "it is already quantized: evaluate or generate with it as it is, or convert the float or QAT "
                      "run it came from",
           "lora": "merge its adapters into its base first with python -m quant.merge (the result is a serving run)"}


def serving_quant_config(source: Config, override: QuantConfig | None) -> QuantConfig:
    """The quantization a serving model gets: `override` if given, else the scheme a QAT source trained with."""
    if override is None:
        if source.quant.mode != "qat":
            raise UserError("a float run needs a quantization scheme to convert to (e.g. --bits 8)")
        override = source.quant
    return dataclasses.replace(override, mode="serve")


def convert_workdir(source: Path, out: Path, quant_cfg: QuantConfig | None = None, log=print) -> Path:
    """Convert the latest checkpoint of `source` (float or QAT) into a serving run in `out`, built whole under a
    temporary name (`train.run.new_run_folder`); UserError if `source` is a serving or LoRA run, a float run gets
    no scheme, or `out` is not a new, empty folder (or is being written by another process). Logs the resolved
    scheme in one line (`quant.plan.describe_scheme`) before converting."""
    source, out = Path(source), Path(out)
    with new_run_folder(source, out) as folder:
        run = load_run(source, refuse=REFUSED)
        serve_quant = serving_quant_config(run.config, quant_cfg)
        config = dataclasses.replace(run.config, quant=serve_quant)
        log(describe_scheme(config.model, serve_quant))
        splits = load_splits(config.data, run.tokenizer)
        sample, _ = get_batch(splits.train, config.train.seed, 0, 1, config.model.seq_len)
        variables = convert(config.model, serve_quant, run.variables["params"], sample)
        write_serving_run(folder, config, run.step, variables, splits, converted_from=str(source.resolve()))
    float_bytes = tree_bytes(run.variables["params"])["total"]
    int_bytes = tree_bytes(variables)["total"]
    log(f"converted {source} (step {run.step}) -> {out}: parameter bytes {float_bytes:,} -> {int_bytes:,} "
        f"({int_bytes / float_bytes:.3f}x)")
    return out
