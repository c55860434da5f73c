"""Post-training quantization of a finished run: load it, quantize its weights to integers by a method (AQT's
round-to-nearest `quant.serving.convert`, or a calibrated one from `quant.ptq_methods`: GPTQ, AWQ, AWQ+GPTQ,
SmoothQuant) and save them as a serving run that records its parent and how it was made.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from checkpoints.manager import tree_bytes
from quant.calibrate import calibration_tokens
from quant.config import QuantConfig
from quant.plan import describe_scheme, small_group_note
from quant.ptq_methods import PTQSettings, check_method, quantize_with_method
from quant.serving import convert
from slm_jax.errors import UserError
from train.config import Config
from train.data import get_batch, load_splits
from train.memory_check import check_option_fits, forward_bytes
from train.run import load_run, new_run_folder, write_serving_run

REFUSED = {"serving": "it is already quantized: evaluate or generate with it as it is, or convert the float or QAT "
                      "run it came from",
           "lora": "merge its adapters into its base first with python -m quant.merge (the result is a serving run)"}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How much training text a calibrated method sees: `batches` windows of `seq_len` tokens (None: the model's
    context) from the TRAINING split, chosen by `seed` (`quant.calibrate.calibration_tokens`)."""

    batches: int = 128  # GPTQ's paper calibrates on 128 random segments
    seq_len: int | None = None
    seed: int = 0


NO_SCHEME = "a float run needs a quantization scheme to convert to (e.g. --bits 8)"


def serving_quant_config(source: Config, override: QuantConfig | None, no_scheme: str = NO_SCHEME) -> QuantConfig:
    """The quantization a serving model gets: `override` if given, else the scheme a QAT source trained with.
    The source's int8 KV cache (quant.kv_bits, a serving choice of any run, float too) is kept unless `override`
    sets one. UserError(`no_scheme`, the calling command's own words) for a float source given no scheme."""
    if override is None:
        if source.quant.mode != "qat":
            raise UserError(no_scheme)
        override = source.quant
    return dataclasses.replace(override, mode="serve", kv_bits=override.kv_bits or source.quant.kv_bits)


def convert_workdir(source: Path, out: Path, quant_cfg: QuantConfig | None = None, log=print, method: str = "rtn",
                    calibration: Calibration = Calibration(), settings: PTQSettings = PTQSettings(),
                    precision: str | None = None) -> Path:
    """Convert the latest checkpoint of `source` (float or QAT) into a serving run in `out` by `method` ("rtn", the
    default, or one of `quant.ptq_methods.METHODS`), calibrated on `calibration` from the training split, built
    whole under a temporary name (`train.run.new_run_folder`). Logs the resolved scheme in one line first.
    `precision` (train.precision: fp32, bf16, fp16) sets the serving run's compute dtype; None keeps the source's.

    The serving run's metadata records `converted_from` (the source path), `converted_from_step` and `ptq` (method
    and seconds quantizing; for calibrated methods `quantize_with_method`'s record: settings, calibration amount,
    per-layer results, plus the seed). UserError, with nothing
    written, if `source` is a serving or LoRA run, a float run gets no scheme, `out` is not a new, empty folder (or
    is being written by another process), the method does not apply to the scheme, the training split holds too
    little calibration text, a calibration forward pass (`settings.chunk` windows of `calibration.seq_len` tokens)
    cannot fit in memory (`train.memory_check`), or a layer's Hessian is singular even with damping.
    """
    source, out = Path(source), Path(out)
    with new_run_folder(source, out) as folder:
        run = load_run(source, refuse=REFUSED)
        serve_quant = serving_quant_config(run.config, quant_cfg)
        config = dataclasses.replace(run.config, quant=serve_quant)
        if precision is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
        splits = load_splits(config.data, run.tokenizer)
        params = run.variables["params"]
        if method != "rtn":  # inapplicable input is refused before the scheme line: one line, nothing else
            tokens = calibration_tokens(splits.train, calibration.batches,
                                        calibration.seq_len or config.model.seq_len, calibration.seed)
            check_method(config.model, serve_quant, method, tokens, settings)
            rows, held = min(settings.chunk, len(tokens)), tree_bytes(run.variables)["total"]  # rows per forward
            check_option_fits("--calib-seq-len", tokens.shape[1],
                              lambda n: forward_bytes(config.model, rows, held, n), f"calibrating {method} on {source}")
        log(describe_scheme(config.model, serve_quant))
        note = small_group_note(config.model, serve_quant)
        if note:
            log(note)
        if method == "rtn":
            sample, _ = get_batch(splits.train, config.train.seed, 0, 1, config.model.seq_len)
            tic = time.perf_counter()
            variables = convert(config.model, serve_quant, params, sample)
            record = {"method": "rtn", "seconds": round(time.perf_counter() - tic, 2)}
        else:
            variables, record = quantize_with_method(config.model, serve_quant, params, method, tokens, settings,
                                                     log=log)
            record["calibration"]["seed"] = calibration.seed
        write_serving_run(folder, config, run.step, variables, splits, converted_from=str(source.resolve()),
                          converted_from_step=run.step, ptq=record)
    float_bytes = tree_bytes(params)["total"]
    int_bytes = tree_bytes(variables)["total"]
    log(f"converted {source} (step {run.step}) -> {out} by {method}: parameter bytes {float_bytes:,} -> "
        f"{int_bytes:,} ({int_bytes / float_bytes:.3f}x)")
    return out
