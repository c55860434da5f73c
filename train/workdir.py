"""Read a finished or running workdir back: its config (from checkpoint metadata), model and variables.

Every command after training goes through here, so nobody re-specifies model sizes by hand.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from checkpoints.manager import CheckpointStore
from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.config import Config


@dataclasses.dataclass
class LoadedRun:
    config: Config
    model: object
    variables: dict  # {"params": ..., plus any frozen collections}
    metadata: dict
    step: int


def open_store(workdir: Path) -> CheckpointStore:
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist")
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{workdir} is not a run directory (no checkpoints/ folder in it)")
    return CheckpointStore(directory, create=False)


def config_from_metadata(metadata: dict, source) -> Config:
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


def load_run(workdir: Path, step: int | None = None) -> LoadedRun:
    """Float, QAT and serving runs alike: the model is rebuilt from the checkpoint's own config."""
    store = open_store(workdir)
    try:
        metadata = store.metadata(step)
        if metadata.get("kind") == "lora":  # adapters only: the base's variables come from its own workdir
            from train.finetune import restore_lora_run
            return restore_lora_run(store, metadata)
        config = config_from_metadata(metadata, workdir)
        model = build_model(config)
        if metadata.get("kind") == "serving":
            from quant.convert import serving_template
            variables = store.restore(serving_template(config.model, config.quant), metadata["step"])
        else:
            state = store.restore(abstract_state(config, model), metadata["step"])
            variables = {"params": state.params, **state.frozen}
    finally:
        store.close()
    return LoadedRun(config, model, variables, metadata, metadata["step"])


def load_params(workdir: Path, config: Config):
    """Float (or QAT) params of another run, to start this one from (`train.init_from`)."""
    run = load_run(workdir)
    if run.config.model != config.model:
        raise UserError(f"train.init_from={workdir} has a different model shape than this config "
                        f"(e.g. d_model {run.config.model.d_model} vs {config.model.d_model})")
    return run.variables["params"]
