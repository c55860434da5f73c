"""A run is a workdir: the resolved config, the tokenizer, `metrics.jsonl` and `checkpoints/`. This module reads any
kind of run back (float, QAT, serving, LoRA) onto this process's devices, whatever mesh wrote it, and creates new
runs whole (`new_run_folder`), so every command after training goes through it and nobody re-specifies model sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

from checkpoints.hf import TOKEN_IDS, import_first, is_model_folder
from checkpoints.lock import LOCK_NAME, lock_workdir, rotated_away
from checkpoints.manager import CheckpointStore, build_metadata, peek_metadata, step_folders
from quant.plan import make_plan, plan_to_json
from quant.serving import served_layout, serving_template
from slm_jax.errors import UserError
from slm_jax.model import Transformer
from train.build import abstract_state, build_model
from train.config import Config, save_yaml
from train.interrupts import signals_held
from train.lora_run import LoraBase, fingerprint, lora_initializer
from train.optim import learning_rate_schedule
from train.precision import all_finite
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


def served_run(run: LoadedRun, precision: str | None = None, **serving) -> LoadedRun:
    """`run` as train.generate serves it: its variables in this backend's serving layout (quant.serving.served_layout,
    e.g. int4 codes in int8 containers on CPU); the loaded arrays that layout replaces are dropped. `serving` sets
    quant fields that change how a serving run is computed, not what it stores (`numerics`,
    `serve_per_channel_int8`; None keeps the run's own), and `precision` the compute dtype (train.precision: fp32,
    bf16 or fp16; None keeps the run's own); the model is rebuilt with them. Raises UserError for another key, or a
    value the config refuses."""
    unknown = set(serving) - {"numerics", "serve_per_channel_int8"}
    if unknown:
        raise UserError(f"only numerics and serve_per_channel_int8 change how a run is served, not {sorted(unknown)}")
    changes = {key: value for key, value in serving.items() if value is not None}
    if changes or precision is not None:
        config = dataclasses.replace(run.config, quant=dataclasses.replace(run.config.quant, **changes))
        if precision is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
        run = dataclasses.replace(run, config=config, model=build_model(config))
    return dataclasses.replace(run, variables=served_layout(run.variables, run.config.model, run.config.quant))


KIND_NAMES = ("float", "qat", "serving", "lora", "imported")
SCHEDULE_KEYS = ("steps", "learning_rate", "warmup_steps", "min_lr_ratio")  # what `learning_rate_schedule` reads
# The optimizer's other settings and the precision: a resume may change them (e.g. a lower grad_clip after a
# spike), and says so.
RESUME_NOTED = ("weight_decay", "beta1", "beta2", "grad_clip", "precision")


def open_store(workdir: Path) -> CheckpointStore:
    """The checkpoint store of an existing run, for reading; UserError if `workdir` is not a run (one saying how to
    import it when it is a Hugging Face model folder)."""
    workdir = Path(workdir)
    if workdir.is_file():
        raise UserError(f"workdir {workdir} is a file, not a run folder")
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist")
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        if is_model_folder(workdir):
            raise import_first(workdir)
        raise UserError(f"{workdir} is not a run directory (no checkpoints/ folder in it)")
    return CheckpointStore(directory, create=False)


def config_from_metadata(metadata: dict, source) -> Config:
    """The Config a checkpoint was saved with; UserError naming `source` if it has none."""
    try:
        return Config.from_dict(metadata["config"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint metadata in {source} has no usable config") from None


def _changed(saved, now, keys) -> list[str]:
    return [f"train.{key} {getattr(saved, key)!r} -> {getattr(now, key)!r}" for key in keys
            if getattr(saved, key) != getattr(now, key)]


def check_schedule(store: CheckpointStore, config: Config, log) -> None:
    """Resuming with other learning-rate schedule settings (e.g. a larger train.steps over a finished run) changes
    the schedule mid-run: UserError naming the changes unless train.extend is true, when it is logged instead.
    Other optimizer settings (`RESUME_NOTED`) may change on resume; each change is logged, so it is never silent.
    Call it after the recipe's own resume checks (same model, quantization and LoRA base)."""
    latest = store.latest_step()
    if latest is None:
        return
    saved = config_from_metadata(store.metadata(latest), store.directory).train
    noted = _changed(saved, config.train, RESUME_NOTED)
    if noted:
        log(f"note: resuming step {latest} with changed settings ({'; '.join(noted)})")
    changes = _changed(saved, config.train, SCHEDULE_KEYS)
    if not changes:
        return
    if not config.train.extend:
        raise UserError(f"{store.directory} was trained to step {latest} with another learning-rate schedule "
                        f"({'; '.join(changes)}); resuming would change it mid-run: add --set train.extend=true "
                        f"to do so, or use another --workdir")
    lr = float(learning_rate_schedule(config.train)(latest))
    log(f"train.extend: the learning-rate schedule changes at step {latest} ({'; '.join(changes)}); "
        f"the learning rate is now {lr:.3e}")


def same_folder(saved: str | None, now: str | None) -> bool:
    """True when both paths name one existing file or folder, however written (relative or absolute, through a
    link)."""
    try:
        return bool(saved and now) and Path(saved).exists() and Path(now).exists() and Path(saved).samefile(now)
    except OSError:
        return False


def keep_init_from(store: CheckpointStore, config: Config, log) -> Config:
    """`config` with the train.init_from the resumed run in `store` was started from. train.init_from only gives a
    new run its first weights; a resume goes on from its checkpoint, so a changed value cannot take effect: it is
    noted with the recorded and the new value (it was ignored without a word), and the recorded one stays in the
    config the run saves, so its lineage (`parent_runs`: e.g. an imported model's token ids) still names the run its
    weights came from. A value naming the same folder otherwise written is no change."""
    latest = store.latest_step()
    if latest is None:
        return config
    saved, now = config_from_metadata(store.metadata(latest), store.directory).train.init_from, config.train.init_from
    if saved == now or same_folder(saved, now):
        return config
    started = f"train.init_from={saved}" if saved else "scratch (train.init_from unset)"
    asked = f"train.init_from={now}" if now else "an unset train.init_from"
    hint = f"; to start from {now}, train into another --workdir" if now else ""
    log(f"note: resuming step {latest} of a run started from {started}: {asked} does not apply, as train.init_from "
        f"only sets a new run's first weights; the run keeps its recorded value{hint}")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=saved))


RESUME_SAME_FINETUNE = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "freeze")


def check_resumable(metadata: dict, config: Config, source) -> None:
    """A workdir can only be resumed by a run of the same model, quantization and fine-tuning method: its
    `RESUME_SAME_FINETUNE` keys too (a new lora_alpha rescaled the trained adapters mid-run without a word; a new
    rank or targets failed on the restored state's shapes). `finetune.base` may name a moved base: its fingerprint
    is checked instead."""
    saved = config_from_metadata(metadata, source)
    for section, keys in (("model", None), ("quant", None), ("finetune", RESUME_SAME_FINETUNE)):
        old, new = getattr(saved, section), getattr(config, section)
        diff = [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                for f in dataclasses.fields(old)
                if (keys is None or f.name in keys) and getattr(old, f.name) != getattr(new, f.name)]
        if diff:
            raise UserError(f"{source} holds a run with a different {section} config ({'; '.join(diff[:3])}); "
                            f"use another --workdir or the same settings")


def run_kind(metadata: dict) -> str:
    """One of KIND_NAMES: what a checkpoint holds, from its metadata (a "train" checkpoint is float or QAT)."""
    kind = metadata.get("kind") or "train"
    if kind == "train":
        return "qat" if (metadata.get("config") or {}).get("quant", {}).get("mode") == "qat" else "float"
    return kind


def on_this_device(abstract):
    """Restore targets (jax.ShapeDtypeStruct leaves) placed whole on this process's first device: Orbax then reads
    a checkpoint written on any mesh (8 devices, fsdp=4, ...) onto the device count a reader has."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


MOVED_BASE_HINT = ("if it moved, give its new folder with --base (the fingerprint the adapters recorded is "
                   "checked)")


def article(word: str) -> str:
    """The indefinite article before `word`: "an" before a vowel, else "a"."""
    return "an" if word[:1] in tuple("aeiou") else "a"


def load_run(workdir: Path, step: int | None = None, base: Path | None = None,
             refuse: dict[str, str] | None = None) -> LoadedRun:
    """Float, QAT, serving and LoRA runs alike, onto this process's first device whatever mesh wrote them: the
    model is rebuilt from the checkpoint's own config. A LoRA run's variables are its base's with the adapters
    merged into "params"; `base` overrides the base path its checkpoint records (a moved base), whose fingerprint
    must match either way. The tokenizer is the run's own (`train.tokenizer.run_tokenizer`: workdir/tokenizer.json
    checked against the recorded sha256).

    `refuse` maps run kinds (KIND_NAMES) a command does not take to what to do instead: such a run is refused in
    one line before any array is read. UserError too when the checkpoint's weights are not finite.

    A Ctrl-C or SIGTERM meanwhile is held until the checkpoint is closed (`train.interrupts.signals_held`): raised
    inside Orbax's restore, it left Orbax's event-loop thread failing, whose traceback a command's exit cut short
    to a bare "Traceback (most recent call last):" line."""
    with signals_held():
        for attempt in range(VANISHED_STEP_RETRIES + 1):
            try:
                return _load_run(workdir, step, base, refuse)
            except StepVanished:
                if step is not None or attempt == VANISHED_STEP_RETRIES:
                    raise


# Reads of a run's latest step that start again when a run training in the workdir deletes that step meanwhile
# (its checkpoint.keep rotation, `checkpoints.lock.rotated_away`), before the error
VANISHED_STEP_RETRIES = 3


class StepVanished(UserError):
    """The step a read chose was deleted while it was read, by a run training in the workdir (checkpoint.keep)."""


def _load_run(workdir: Path, step: int | None, base: Path | None, refuse: dict[str, str] | None) -> LoadedRun:
    store = open_store(workdir)
    chosen = step if step is not None else store.latest_step()
    try:
        return _read_run(workdir, store, chosen, base, refuse)
    except Exception:
        if not rotated_away(store.directory, chosen):
            raise
        raise vanished(store, chosen) from None
    finally:
        store.close()


def vanished(store: CheckpointStore, step: int) -> StepVanished:
    return StepVanished(f"checkpoint {store.directory}/{step} was deleted while it was read, by the run training in "
                        f"{store.directory.parent} (it keeps its latest checkpoint.keep steps; have now: "
                        f"{step_folders(store.directory)}); read one of them, or wait for the training to finish")


def _read_run(workdir: Path, store: CheckpointStore, step: int | None, base: Path | None,
              refuse: dict[str, str] | None) -> LoadedRun:
    """load_run's work on an open `store`."""
    metadata = store.metadata(step)
    kind = run_kind(metadata)
    if kind in (refuse or {}):
        raise UserError(f"{workdir} is a {kind} run; {refuse[kind]}")
    config = config_from_metadata(metadata, workdir)
    model = build_model(config)
    if kind == "lora":  # adapters only: the base's variables come from its own workdir
        recorded = metadata.get("base") or {}
        lora_base = open_lora_base(base or recorded.get("path") or config.finetune.base,
                                   key=f"base of {store.directory}", hint=None if base else MOVED_BASE_HINT)
        lora_base.check(recorded, store.directory)
        state = store.restore(on_this_device(jax.eval_shape(lora_initializer(config, model))), metadata["step"])
        variables = merge_variables(state.params, lora_base.variables)
    elif kind == "serving":
        variables = store.restore(on_this_device(serving_template(config.model, config.quant)),
                                  metadata["step"])
    elif kind == "imported":  # params only (checkpoints.hf_import)
        variables = store.restore(on_this_device({"params": abstract_state(config, model).params}),
                                  metadata["step"])
    else:
        state = store.restore(on_this_device(abstract_state(config, model)), metadata["step"])
        variables = {"params": state.params, **state.frozen}
    if not bool(jax.jit(all_finite)(variables)):
        others = [s for s in store.steps() if s != metadata["step"]]
        raise UserError(f"checkpoint {store.directory}/{metadata['step']} holds non-finite weights (NaN or inf), "
                        f"saved by a version that did not check; use another step" +
                        (f" (have: {others})" if others else "") + " or train again")
    return LoadedRun(config, model, variables, metadata, metadata["step"],
                     run_tokenizer(workdir, metadata.get("tokenizer")))


def check_base_used(base: Path | None, workdirs: list[Path]) -> None:
    """UserError when `--base` is given but none of `workdirs` is a LoRA run, the only kind that reads it: the
    option would be dropped without a word (a mistyped command meant for another run)."""
    if base is None:
        return
    kinds = []
    for workdir in workdirs:
        store = open_store(workdir)
        try:
            kinds.append(run_kind(store.metadata()))
        finally:
            store.close()
    if "lora" not in kinds:
        runs = (f"{workdirs[0]} is {article(kinds[0])} {kinds[0]} run" if len(kinds) == 1 else
                "none of " + ", ".join(f"{w} ({k})" for w, k in zip(workdirs, kinds)) + " is one")
        raise UserError(f"--base {base}: only LoRA runs read a base, and {runs}")


LINEAGE_HOPS = 32  # a run derives from at most this many ancestors (a guard against a loop of paths)


def parent_runs(metadata: dict) -> list[str]:
    """The workdirs a run was made from, as its metadata records them: converted_from (quant.convert),
    merged_from (quant.merge), a LoRA run's base, train.init_from and finetune.base (training from another run)."""
    config = metadata.get("config") or {}
    parents = [metadata.get("converted_from"), metadata.get("merged_from"), (metadata.get("base") or {}).get("path"),
               (config.get("train") or {}).get("init_from"), (config.get("finetune") or {}).get("base")]
    return [str(p) for p in parents if isinstance(p, str) and p]


def imported_token_ids(workdir: Path, metadata: dict | None = None) -> dict:
    """The bos/eos/pad token ids of the Hugging Face model a run comes from: its own `imported_from` record, or that
    of the first imported run up its lineage (`parent_runs`, read from metadata only, no arrays), so converted,
    merged, LoRA and fine-tuned runs of an imported model export its ids. {} when no run in the lineage was imported
    or the lineage is broken (a parent moved or deleted)."""
    seen, pending = set(), [(Path(workdir), metadata)]
    while pending and len(seen) < LINEAGE_HOPS:
        path, meta = pending.pop(0)
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if meta is None:
            try:
                store = open_store(path)
                try:
                    meta = store.metadata()
                finally:
                    store.close()
            except UserError:
                continue
        source = meta.get("imported_from")
        if isinstance(source, dict):
            return {key: source[key] for key in TOKEN_IDS if source.get(key) is not None}
        pending.extend((Path(parent), None) for parent in parent_runs(meta))
    return {}


def tokenizer_of(workdir: Path):
    """The tokenizer of the run in `workdir` (its latest checkpoint's), without restoring any arrays; UserError if
    `workdir` is not a run or its tokenizer.json is missing or differs from the recorded sha256."""
    store = open_store(workdir)
    try:
        return run_tokenizer(workdir, store.metadata().get("tokenizer"))
    finally:
        store.close()


def open_lora_base(path: str | Path, key: str = "finetune.base", hint: str | None = None) -> LoraBase:
    """The serving run at `path` that LoRA adapters train over; UserError naming `key` if it cannot be read or is
    not a serving run, ending with `hint` (default: how to make a base) unless a run is there (damaged, say)."""
    try:
        run = load_run(Path(path), refuse={"lora": "LoRA trains over a serving run: merge it first with "
                                                   f"python -m quant.merge and set {key} to the merged run"})
    except UserError as err:
        if Path(path, "checkpoints").is_dir():  # a run is there but cannot be read: the error says why
            raise UserError(f"{key}: cannot open the base model {path} ({err})") from None
        hint = hint or ("make it first, e.g. with the commands atop configs/finetune_int4_lora.yaml (python -m "
                        "train.main --config finetune_base, then --config finetune_base_int4)")
        raise UserError(f"{key}: cannot open the base model {path} ({err}); {hint}") from None
    if run_kind(run.metadata) != "serving":
        raise UserError(f"{key}: {path} is a {run_kind(run.metadata)} run; LoRA trains over a serving "
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
    return with_tokenizer_of(workdir, config, run_tokenizer(workdir, metadata.get("tokenizer")))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a run's model comes from when another run supplies it: `key` (finetune.base or train.init_from) and
    `path` name that run; `config` is this run's config with the sections taken from it (the model for both, the
    quant section too for a LoRA base); `fields` maps each section taken to the fields it decides."""

    key: str
    path: str
    config: Config
    fields: dict


def stored_metadata(workdir: Path) -> dict:
    """The latest checkpoint's metadata of the run in `workdir`, through Orbax (which starts JAX's backend)."""
    store = open_store(Path(workdir))
    try:
        return store.metadata()
    finally:
        store.close()


def peeked_metadata(workdir: Path) -> dict:
    """`stored_metadata` read as plain JSON (`checkpoints.manager.peek_metadata`), leaving JAX's backend idle;
    UserError when it cannot be read so."""
    metadata = peek_metadata(Path(workdir) / "checkpoints")
    if metadata is None:
        raise UserError(f"{workdir} has no checkpoint metadata readable without Orbax")
    return metadata


def model_source(config: Config, metadata_of=stored_metadata) -> ModelSource | None:
    """The run that supplies this run's model (a LoRA run's finetune.base: its model and quant sections whole;
    train.init_from: its model section but `TRAINING_FIELDS`, as `with_model_of`), read from its metadata
    (`metadata_of(workdir)`; `peeked_metadata` before JAX's backend may start) without restoring arrays; None for
    a run of its own shape, or when that run cannot be read (training says why)."""
    if config.finetune.method == "lora" and config.finetune.base:
        key, path, sections = "finetune.base", config.finetune.base, ("model", "quant")
    elif config.train.init_from:
        key, path, sections = "train.init_from", config.train.init_from, ("model",)
    else:
        return None
    try:
        source = config_from_metadata(metadata_of(Path(path)), path)
    except UserError:
        return None
    own = () if key == "finetune.base" else TRAINING_FIELDS
    model = dataclasses.replace(source.model, **{name: getattr(config.model, name) for name in own})
    taken = dataclasses.replace(config, model=model, **({"quant": source.quant} if "quant" in sections else {}))
    fields = {section: [f.name for f in dataclasses.fields(getattr(config, section))
                        if not (section == "model" and f.name in own)] for section in sections}
    return ModelSource(key, path, taken, fields)


def with_tokenizer_of(workdir: Path, config: Config, tokenizer=None) -> Config:
    """`config` with the tokenizer of the run in `workdir` (`tokenizer`, else read from it) where `config` keeps
    the default byte tokenizer: a run started from another (`train.init_from`, a LoRA `finetune.base`) keeps its
    tokenizer without naming it by hand. UserError if `workdir` is not a run."""
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(workdir)
    if config.data.tokenizer == "byte" and tokenizer.kind != "byte":
        asked = tokenizer.kind if tokenizer.kind in KINDS else str(Path(workdir) / TOKENIZER_FILE)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=asked))
    return config


def load_params(workdir: Path, config: Config):
    """Float (or QAT) params of another run, to start this one from (`train.init_from`); UserError for a serving or
    LoRA run, or unless its weights have this config's shapes (fields in `TRAINING_FIELDS` may differ)."""
    run = load_run(workdir, refuse={
        "serving": "train.init_from takes a float or QAT run: its integer weights cannot train; start from the run "
                   "it was converted from, or fine-tune it with LoRA (finetune.method=lora, finetune.base)",
        "lora": "train.init_from takes a float or QAT run: merge it first (python -m quant.merge) and fine-tune "
                "the merged run with LoRA (finetune.base)"})
    own = {name: getattr(config.model, name) for name in TRAINING_FIELDS}
    if dataclasses.replace(run.config.model, **own) != config.model:
        raise UserError(f"train.init_from={workdir} has a different model shape than this config "
                        f"(e.g. d_model {run.config.model.d_model} vs {config.model.d_model})")
    return run.variables["params"]


def check_output_folder(source: Path, out: Path) -> None:
    """A new run (converted, merged, imported) gets its own folder, absent or empty: nothing is ever overwritten."""
    out = Path(out)
    if out.resolve() == Path(source).resolve():
        raise UserError("the new run needs its own folder: --out must differ from --workdir")
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder for the new run")
    check_out_parent(out)
    if out.is_dir() and any(out.iterdir()):
        what = "already holds checkpoints" if (out / "checkpoints").is_dir() else "is not empty"
        raise UserError(f"{out} {what}; choose an empty --out folder")


def check_outside_checkpoints(path: Path, flag: str = "--out") -> None:
    """UserError naming `flag` when `path` lies inside a run's checkpoints/ folder (at any depth): Orbax would read a
    folder made there as one of that run's steps, an incomplete one, and every command on that run, its own
    training's resume included, would then fail on it. The path is checked as written with `..` taken away and as it
    resolves through links (a link to a run's checkpoints/ folder leads inside it too)."""
    for parent in (*Path(os.path.abspath(path)).parents, *Path(path).resolve().parents):
        if parent.name == "checkpoints" and any((parent.parent / name).is_file() for name in RUN_FILES):
            raise UserError(f"{flag} {path} lies inside {parent}, the checkpoints folder of the run {parent.parent}: a "
                            f"folder there is read as one of its steps (or changes one); choose a folder outside it")


RUN_FILES = ("config.yaml", TOKENIZER_FILE)  # what every run folder holds beside checkpoints/


def check_out_parent(out: Path) -> None:
    """UserError naming --out when a folder above it is a file or nothing can be made in the nearest existing folder
    above it (no permission, a read-only or virtual file system: probed by making an unnamed temporary file there,
    which root's permission bits would not tell), said before any temporary sibling of `out` is made, so the
    message names the user's path rather than the temporary one; or when it lies inside a run's checkpoints/
    folder (`check_outside_checkpoints`)."""
    check_outside_checkpoints(out)
    for parent in Path(out).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out} cannot be made: {parent} is a file, not a folder")
            try:
                with tempfile.TemporaryFile(dir=parent):
                    pass
            except OSError as err:
                why = "no permission to write" if err.errno in (errno.EACCES, errno.EPERM) else err.strerror
                raise UserError(f"--out {out} cannot be made: {why} in {parent}") from None
            return


def partial_folder(out: Path) -> Path:
    """Where the run that will be `out` is built: a hidden sibling, `<parent>/.<name>.partial`."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def new_run_folder(source: Path, out: Path) -> Iterator[Path]:
    """Build a new run in `partial_folder(out)`, locked (`checkpoints.lock`) against a second writer, and rename
    it to `out` when the block completes; on any error it is removed. So a run never exists half-made under its
    name, and a partial folder left by a killed writer (its lock died with it) is cleared by the next one.
    UserError if `out` is `source`, a file or a non-empty folder, or another process is building it."""
    out = Path(out)
    check_output_folder(source, out)
    partial = partial_folder(out)
    with lock_workdir(partial):
        check_output_folder(source, out)  # another writer may have finished it meanwhile
        for leftover in partial.iterdir():  # a killed writer's files
            if leftover.name != LOCK_NAME:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        try:
            yield partial
            check_output_folder(source, out)  # still absent or empty once the work is done
            os.replace(partial, out)  # atomic; replaces an empty folder; the lock file goes along, as in any run
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def write_serving_run(folder: Path, config: Config, step: int, variables, splits, **extra) -> None:
    """Save serving `variables` as the only checkpoint of `folder` (from `new_run_folder`) with the metadata every
    run carries, plus `extra` (e.g. where it was converted from), its config.yaml and tokenizer. A Ctrl-C or SIGTERM
    meanwhile waits for the checkpoint to be closed, as in `load_run` (the folder is removed by `new_run_folder`)."""
    with signals_held():
        store = CheckpointStore(folder / "checkpoints", keep=1, async_save=False)
        try:
            store.save(step, variables, build_metadata(
                config.to_dict(), step, variables, splits.description["tokenizer"], kind="serving",
                quant_plan=plan_to_json(make_plan(config.model, config.quant)), data=splits.description, **extra))
        finally:
            store.close()
    save_yaml(config, folder / "config.yaml")
    save_tokenizer(splits.tokenizer, folder)
