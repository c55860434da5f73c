"""Post-training quantization of a finished run: load it, convert its weights to integers with AQT, save a
serving checkpoint, and show float vs quantized validation loss side by side (the same code path as evaluate).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from checkpoints.manager import CheckpointStore, build_metadata, tree_bytes
from quant.config import QuantConfig
from quant.convert import convert
from quant.plan import make_plan, plan_to_json
from slm_jax.errors import UserError
from train.config import Config, save_yaml
from train.data import ByteTokenizer, get_batch, load_splits
from train.workdir import load_run


def serving_quant_config(source: Config, override: QuantConfig | None) -> QuantConfig:
    """The quantization a serving model gets: `override` if given, else the scheme a QAT source trained with."""
    if override is None:
        if source.quant.mode != "qat":
            raise UserError("a float run needs a quantization scheme to convert to (e.g. --bits 8)")
        override = source.quant
    return dataclasses.replace(override, mode="serve")


def check_output_folder(source: Path, out: Path) -> None:
    """A new serving run (converted or merged) gets its own, empty folder: nothing is ever overwritten."""
    if Path(out).resolve() == Path(source).resolve():
        raise UserError("the new run needs its own folder: --out must differ from --workdir")
    if (Path(out) / "checkpoints").exists() and any((Path(out) / "checkpoints").iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose an empty --out folder")


def write_serving_run(out: Path, config: Config, step: int, variables, splits, **extra) -> None:
    """Save serving `variables` as the only checkpoint of `out` (removed again if the save fails) with the
    metadata every run carries, plus `extra` (e.g. where it was converted from), and its config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", keep=1, async_save=False)
    try:
        store.save(step, variables, build_metadata(
            config.to_dict(), step, variables, splits.description["tokenizer"], kind="serving",
            quant_plan=plan_to_json(make_plan(config.model, config.quant)), data=splits.description, **extra))
    except BaseException:
        store.close()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        raise
    store.close()
    save_yaml(config, out / "config.yaml")


def convert_workdir(source: Path, out: Path, quant_cfg: QuantConfig | None = None, log=print) -> Path:
    """Convert the latest checkpoint of `source` (float or QAT) into a serving run in `out`."""
    source, out = Path(source), Path(out)
    check_output_folder(source, out)
    run = load_run(source)
    if run.metadata.get("kind") == "serving":
        raise UserError(f"{source} is already a serving (integer) run")
    serve_quant = serving_quant_config(run.config, quant_cfg)
    config = dataclasses.replace(run.config, quant=serve_quant)
    splits = load_splits(config.data, ByteTokenizer())
    sample, _ = get_batch(splits.train, config.train.seed, 0, 1, config.model.seq_len)
    variables = convert(config.model, serve_quant, run.variables["params"], sample)
    write_serving_run(out, config, run.step, variables, splits, converted_from=str(source.resolve()))
    float_bytes = tree_bytes(run.variables["params"])["total"]
    int_bytes = tree_bytes(variables)["total"]
    log(f"converted {source} (step {run.step}) -> {out}: parameter bytes {float_bytes:,} -> {int_bytes:,} "
        f"({int_bytes / float_bytes:.3f}x)")
    return out
