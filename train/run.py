"""A run is a workdir: the resolved config, the tokenizer, `metrics.jsonl` and `checkpoints/`. This module reads any
kind of run back (float, QAT, serving, LoRA) and writes serving runs, so every command after training goes through
it and nobody re-specifies model sizes by hand.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from checkpoints.manager import CheckpointStore, build_metadata
from quant.plan import make_plan, plan_to_json
from quant.serving import serving_template
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from train.build import abstract_state, build_model
from train.config import Config, save_yaml
from train.lora_run import LoraBase, fingerprint, lora_initializer
from train.steps import merge_variables
from train.tokenizer import KINDS, TOKENIZER_FILE, run_tokenizer, save_tokenizer


@dataclasses.dataclass
class LoadedRun:
    config: Config
    model: Transformer
    variables: dict  # {"params": ..., plus any frozen collections}
    metadata: dict
    step: int
    tokenizer: object  # train.tokenizer: what turns text into this run's ids and back


def open_store(workdir: Path) -> CheckpointStore:
    """The checkpoint store of an existing run, for reading; UserError if `workdir` is not a run."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist")
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{workdir} is not a run directory (no checkpoints/ folder in it)")
    return CheckpointStore(directory, create=False)


def config_from_metadata(metadata: dict, source) -> Config:
    """The Config a checkpoint was saved with; UserError naming `source` if it has none."""
    try:
        return Config.from_dict(metadata["config"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint metadata in {source} has no usable config") from None


def check_resumable(metadata: dict, config: Config, source) -> None:
    """A workdir can only be resumed by a run of the same model and quantization."""
    saved = config_from_metadata(metadata, source)
    for section in ("model", "quant"):
        old, new = getattr(saved, section), getattr(config, section)
        if old != new:
            diff = [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                    for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
            raise UserError(f"{source} holds a run with a different {section} config ({'; '.join(diff[:3])}); "
                            f"use another --workdir or the same settings")


def load_run(workdir: Path, step: int | None = None, base: Path | None = None) -> LoadedRun:
    """Float, QAT, serving and LoRA runs alike: the model is rebuilt from the checkpoint's own config. A LoRA run's
    variables are its base's with the adapters merged into "params"; `base` overrides the base path its checkpoint
    records (a moved base), whose fingerprint must match either way. The tokenizer is the run's own
    (`train.tokenizer.run_tokenizer`: workdir/tokenizer.json checked against the recorded sha256)."""
    store = open_store(workdir)
    try:
        metadata = store.metadata(step)
        config = config_from_metadata(metadata, workdir)
        model = build_model(config)
        kind = metadata.get("kind")
        if kind == "lora":  # adapters only: the base's variables come from its own workdir
            recorded = metadata.get("base") or {}
            lora_base = open_lora_base(base or recorded.get("path") or config.finetune.base,
                                       key=f"base of {store.directory}")
            lora_base.check(recorded, store.directory)
            state = store.restore(jax.eval_shape(lora_initializer(config, model)), metadata["step"])
            variables = merge_variables(state.params, lora_base.variables)
        elif kind == "serving":
            variables = store.restore(serving_template(config.model, config.quant), metadata["step"])
        elif kind == "imported":  # params only (checkpoints.hf_import)
            variables = store.restore({"params": abstract_state(config, model).params}, metadata["step"])
        else:
            state = store.restore(abstract_state(config, model), metadata["step"])
            variables = {"params": state.params, **state.frozen}
    finally:
        store.close()
    return LoadedRun(config, model, variables, metadata, metadata["step"],
                     run_tokenizer(workdir, metadata.get("tokenizer")))


def tokenizer_of(workdir: Path):
    """The tokenizer of the run in `workdir` (its latest checkpoint's), without restoring any arrays; UserError if
    `workdir` is not a run or its tokenizer.json is missing or differs from the recorded sha256."""
    store = open_store(workdir)
    try:
        return run_tokenizer(workdir, store.metadata().get("tokenizer"))
    finally:
        store.close()


def open_lora_base(path: str | Path, key: str = "finetune.base") -> LoraBase:
    """The serving run at `path` that LoRA adapters train over; UserError naming `key` if it cannot be read or is
    not a serving run."""
    try:
        run = load_run(Path(path))
    except UserError as err:
        raise UserError(f"{key}: cannot open the base model {path} ({err}); make it first, e.g. with the "
                        f"commands atop configs/finetune_int4_lora.yaml (python -m train.main --config "
                        f"finetune_base, then --config finetune_base_int4)") from None
    if run.metadata.get("kind") != "serving":
        raise UserError(f"{key}: {path} is a {run.metadata.get('kind')} run; LoRA trains over a serving "
                        f"(integer) run: convert it first (e.g. --config ptq_int4 --set train.init_from={path})")
    return LoraBase(Path(path).resolve(), run.step, fingerprint(run.variables), run.config, run.variables)


TRAINING_FIELDS = ("seq_len", "dropout", "quantize_attention")  # model fields a run may choose for itself


def with_model_of(workdir: Path, config: Config) -> Config:
    """`config` with the model section of the run in `workdir` (read from its metadata, no arrays restored), except
    the fields that only shape training (`TRAINING_FIELDS`: window, dropout, quantized attention), which stay
    `config`'s; and, where `config` keeps the default byte tokenizer, that run's tokenizer. So a run started from
    another (`train.init_from`: an imported model, a float parent) never repeats its shape or tokenizer by hand.
    UserError if `workdir` is not a run."""
    store = open_store(workdir)
    try:
        metadata = store.metadata()
    finally:
        store.close()
    source = config_from_metadata(metadata, workdir).model
    own = {name: getattr(config.model, name) for name in TRAINING_FIELDS}
    config = dataclasses.replace(config, model=dataclasses.replace(source, **own))
    tokenizer = run_tokenizer(workdir, metadata.get("tokenizer"))
    if config.data.tokenizer == "byte" and tokenizer.kind != "byte":
        asked = tokenizer.kind if tokenizer.kind in KINDS else str(Path(workdir) / TOKENIZER_FILE)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=asked))
    return config


def load_params(workdir: Path, config: Config):
    """Float (or QAT) params of another run, to start this one from (`train.init_from`); UserError unless its
    weights have this config's shapes (fields in `TRAINING_FIELDS` may differ)."""
    run = load_run(workdir)
    own = {name: getattr(config.model, name) for name in TRAINING_FIELDS}
    if dataclasses.replace(run.config.model, **own) != config.model:
        raise UserError(f"train.init_from={workdir} has a different model shape than this config "
                        f"(e.g. d_model {run.config.model.d_model} vs {config.model.d_model})")
    return run.variables["params"]


def check_output_folder(source: Path, out: Path) -> None:
    """A new serving run (converted or merged) gets its own, empty folder: nothing is ever overwritten."""
    if Path(out).resolve() == Path(source).resolve():
        raise UserError("the new run needs its own folder: --out must differ from --workdir")
    if (Path(out) / "checkpoints").exists() and any((Path(out) / "checkpoints").iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose an empty --out folder")


def write_serving_run(out: Path, config: Config, step: int, variables, splits, **extra) -> None:
    """Save serving `variables` as the only checkpoint of `out` (removed again if the save fails) with the
    metadata every run carries, plus `extra` (e.g. where it was converted from), its config.yaml and tokenizer."""
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
    save_tokenizer(splits.tokenizer, out)
