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


def convert_workdir(source: Path, out: Path, quant_cfg: QuantConfig | None = None, log=print) -> Path:
    """Convert the latest checkpoint of `source` (float or QAT) into a serving run in `out`."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise UserError("the serving run needs its own folder: --out must differ from --workdir")
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose an empty --out folder")
    run = load_run(source)
    if run.metadata.get("kind") == "serving":
        raise UserError(f"{source} is already a serving (integer) run")
    serve_quant = serving_quant_config(run.config, quant_cfg)
    config = dataclasses.replace(run.config, quant=serve_quant)
    plan = make_plan(config.model, serve_quant)
    splits = load_splits(config.data, ByteTokenizer())
    sample, _ = get_batch(splits.train, config.train.seed, 0, 1, config.model.seq_len)
    variables = convert(config.model, serve_quant, run.variables["params"], sample)
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", keep=1, async_save=False)
    try:
        store.save(run.step, variables, build_metadata(
            config.to_dict(), run.step, variables, splits.description["tokenizer"], kind="serving",
            quant_plan=plan_to_json(plan), converted_from=str(source.resolve()), data=splits.description))
    except BaseException:
        store.close()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        raise
    store.close()
    save_yaml(config, out / "config.yaml")
    float_bytes = tree_bytes(run.variables["params"])["total"]
    int_bytes = tree_bytes(variables)["total"]
    log(f"converted {source} (step {run.step}) -> {out}: parameter bytes {float_bytes:,} -> {int_bytes:,} "
        f"({int_bytes / float_bytes:.3f}x)")
    return out
