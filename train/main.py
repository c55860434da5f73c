"""`python -m train.main --config NAME [--set section.key=value ...] [--workdir DIR]`: train (or resume) a model."""
from __future__ import annotations

from train.interrupts import STOP, Terminated, exit_now, in_command, say_line  # standard library only

if __name__ == "__main__":  # before the imports below load JAX: a Ctrl-C meanwhile is recorded, never lost in a
    STOP.install()  # callback (see train.interrupts)

import argparse
import contextlib
import shutil
import signal
import sys
from pathlib import Path

import jax

from checkpoints.lock import LOCK_NAME, lock_workdir
from quant.config import QuantConfig
from slm_jax.errors import UserError
from train.cli import (USER_ERROR_EXIT, ArgumentParser, main_guard, os_error_line, path_arg, positive_int,
                       require_one_process)
from train.config import load_config, read_yaml, resolve_path
from train.cpu_devices import MAX_AUTO_DEVICES, gains_from_split, split_cpu_host, step_flops, usable_cores
from train.evaluation import conversion_rows, format_table
from train.loop import run_training
from train.memory_check import check_fits, training_bytes
from train.ptq import convert_workdir
from train.run import check_outside_checkpoints, model_source, open_store, peeked_metadata, run_kind
from train.sharding import lost_peer, maybe_initialize_distributed


LOST_PEER_EXIT = 1  # a multi-process run whose collective lost a process (train.sharding.lost_peer)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.main", description=__doc__)
    parser.add_argument("--config", required=True,
                        help="a name in configs/ (tiny, baseline, int8_qat, ...) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set train.steps=200")
    parser.add_argument("--workdir", type=path_arg, help="output folder (default runs/<config name>/)")
    parser.add_argument("--profile", type=positive_int, metavar="N",
                        help="write a jax.profiler trace of N training steps, after the first compiled one, to "
                             "<workdir>/profile (view with TensorBoard's profile plugin or XProf)")
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    """A first Ctrl-C or SIGTERM is recorded (train.interrupts.STOP) and acted on at a step boundary of training, or
    when the command's work is done; a second stops at once. Exit 130 for Ctrl-C, 143 for SIGTERM. In a
    multi-process run, a collective that fails because another process is gone (`train.sharding.lost_peer`) is one
    line and exit 1, never the JaxRuntimeError's traceback; its UserError (or OSError) ends it at once, in
    main_guard's one line and exit 2."""
    try:
        with STOP.installed():
            train(argv)
            STOP.check()  # a stop asked for during work that has no step boundary (a conversion, start-up)
    except Terminated:
        say_line("terminated")
        sys.exit(128 + signal.SIGTERM)
    except (UserError, OSError) as err:
        if not (in_command() and jax.distributed.is_initialized()):
            raise
        # at once, as main_guard's line: jax.distributed's exit waits on a shutdown barrier that the other processes,
        # still in a restore or a collective (only this one found its shards damaged), never reach; it aborted with
        # a native stack trace (SIGABRT) after SLM_JAX_SHUTDOWN_TIMEOUT_S
        exit_now(USER_ERROR_EXIT, f"error: {err if isinstance(err, UserError) else os_error_line(err)}")
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if not lost_peer(err):
            raise
        line = (f"process {jax.process_index()}: lost contact with another process during a collective (it exited "
                f"or was killed); the last checkpoint is intact, resume with the same command")
        if in_command():  # at once: jax.distributed's exit would wait on the gone process's shutdown barrier
            exit_now(LOST_PEER_EXIT, line)
        say_line(line)
        sys.exit(LOST_PEER_EXIT)


def train(argv=None):
    """What `main` runs: parse `argv`, then convert (quant.mode=serve) or train; UserError for bad input."""
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)  # no JAX call: jax.distributed may still be initialized
    workdir = args.workdir or Path("runs") / resolve_path(args.config).stem
    if config.quant.mode == "serve":  # post-training quantization of the run named by train.init_from
        require_one_process("python -m train.main with quant.mode=serve")
        if args.profile:
            raise UserError("--profile traces training steps; quant.mode=serve converts a run and trains nothing")
        if not config.train.init_from:
            raise UserError("quant.mode=serve converts an existing run: set train.init_from to its workdir")
        if not Path(config.train.init_from).is_dir():
            raise UserError(f"train.init_from: {config.train.init_from} does not exist (the run to quantize: train it "
                            f"first, e.g. python -m train.main --config baseline, or --set train.init_from=WORKDIR)")
        check_outside_checkpoints(workdir, "--workdir")  # before convert_workdir's check, which names --out
        keys = override_keys(args.overrides)
        ignored = [key for key in keys if not key.startswith("quant.") and key not in PTQ_KEYS]
        if ignored:
            print(f"note: post-training quantization converts train.init_from as it was trained; "
                  f"{', '.join(ignored)} do(es) not apply (only quant.*, {', '.join(sorted(PTQ_KEYS))})")
        precision = config.train.precision if "train.precision" in keys else None
        if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
            check_same_conversion(workdir, config, precision)
            print(f"{workdir} already holds the converted model")
        else:
            convert_workdir(Path(config.train.init_from), workdir, config.quant, precision=precision)
        print(format_table(conversion_rows(Path(config.train.init_from), workdir, config.train.eval_batches,
                                           config.train.batch_size)))
        return
    check_quant_overrides(args.overrides, config)
    distributed = maybe_initialize_distributed()
    if distributed:
        STOP.reclaim()  # SIGTERM back from jax.distributed's preemption notifier: all processes stop at one step
    # the checks before training measure the model that trains: train.init_from's or a LoRA base's shape
    if not distributed:  # read as plain JSON: Orbax's reader starts JAX's backend, which then keeps one CPU device
        peeked = model_source(config, metadata_of=peeked_metadata)
        model = (peeked.config if peeked else config).model
        flops = step_flops(model, config.train.batch_size * model.seq_len)
        note = cpu_split_note(config, split_cpu_host(config.mesh, config.train.batch_size, flops=flops), flops)
        if note:
            print(note)
    source = model_source(config)  # after jax.distributed and the CPU split: this read starts JAX's backend
    check_source_overrides(args.overrides, config, source)
    trained = source.config if source else config
    check_fits(training_bytes(trained.model, config.train.batch_size, config.finetune.method != "lora"),
               f"training this model (model.d_model {trained.model.d_model}, model.n_layers "
               f"{trained.model.n_layers}, model.seq_len {trained.model.seq_len}) at train.batch_size "
               f"{config.train.batch_size}")
    # One writer per run: a second train.main on it is refused in one line. In a multi-process run the processes of
    # one run share it, so only process 0 holds the lock.
    check_outside_checkpoints(workdir, "--workdir")
    created = not workdir.exists()
    try:
        with lock_workdir(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            run_training(config, workdir, profile_steps=args.profile or 0)
    except UserError:
        if created and jax.process_index() == 0:
            remove_if_untouched(workdir)  # a refused run leaves no folder behind to block the next command
        raise


# quant.* keys that only a quantized run reads: with quant.mode none (a float run) they would change nothing
QUANT_SCHEME_KEYS = ("weight_bits", "act_bits", "embed_bits", "granularity", "group_size", "bwd_bits", "numerics",
                     "scale_dtype", "serve_per_channel_int8", "rules", "scheme")


def override_keys(overrides) -> list[str]:
    """The dotted key of each `--set key=value` (e.g. "quant.weight_bits"), in order."""
    return [text.split("=", 1)[0].strip() for text in overrides]


def override_fields(overrides) -> list[tuple[str, str]]:
    """(section, field) of each `--set section.field...=value` (`override_keys` with at least one dot), in order."""
    return [(parts[0], parts[1]) for parts in (key.split(".") for key in override_keys(overrides)) if len(parts) >= 2]


def check_quant_overrides(overrides, config) -> None:
    """UserError for a `--set quant.KEY` that a float run (quant.mode none, not LoRA, whose base decides its quant
    section) would record and never use: the user meant quantization-aware training, which it would not be."""
    if config.quant.mode != "none" or config.finetune.method == "lora":
        return
    defaults = QuantConfig()
    for section, name in override_fields(overrides):
        if section == "quant" and name in QUANT_SCHEME_KEYS \
                and getattr(config.quant, name) != getattr(defaults, name):
            raise UserError(f"--set quant.{name}: quant.mode is none (float training), which quantizes nothing; add "
                            f"--set quant.mode=qat for quantization-aware training, or quantize a trained run with "
                            f"python -m quant.convert")


def check_source_overrides(overrides, config, source) -> None:
    """UserError for a `--set model.KEY` (or, for LoRA, `quant.KEY`) that the run named by train.init_from or
    finetune.base decides (`train.run.model_source`) and that differs from that run's value: training would use
    that run's value and drop the one asked for without a word."""
    if source is None:
        return
    for section, name in override_fields(overrides):
        if name not in source.fields.get(section, ()):
            continue
        asked, used = getattr(getattr(config, section), name), getattr(getattr(source.config, section), name)
        if asked != used:
            raise UserError(f"--set {section}.{name}={asked}: this run's {section} section comes from {source.key}="
                            f"{source.path}, which has {section}.{name}={used}; drop the --set (or train a new model "
                            f"without {source.key})")


def cpu_split_note(config, count: int | None, flops: float) -> str | None:
    """A line saying why a CPU run trains on fewer devices than its cores or than mesh.cpu_devices asked for (the
    environment chose the count, or the batch does not split over every core), else None (also for a model too
    small to gain from the split, `flops` per step: one device is the expected case there)."""
    if jax.default_backend() != "cpu":
        return None
    if count is None and config.mesh.cpu_devices:
        return (f"note: the environment (XLA_FLAGS or JAX_NUM_CPU_DEVICES) sets {jax.device_count()} CPU devices; "
                f"mesh.cpu_devices={config.mesh.cpu_devices} is not used")
    cores = usable_cores()
    if count is not None and not config.mesh.cpu_devices and config.mesh.data == -1 and gains_from_split(flops) \
            and count < min(cores, MAX_AUTO_DEVICES):
        return (f"note: train.batch_size {config.train.batch_size} does not split evenly over {cores} cores: "
                f"training on {count} CPU device(s) (mesh.cpu_devices)")
    return None


# what post-training quantization (quant.mode=serve) reads of the config besides quant.*: the run to convert, the
# serving run's compute dtype, and how its evaluation afterwards batches
PTQ_KEYS = frozenset({"train.init_from", "train.precision", "train.eval_batches", "train.batch_size"})


def check_same_conversion(workdir: Path, config, precision: str | None = None) -> None:
    """UserError unless the serving run in `workdir` was converted from `config`'s train.init_from with its quant
    section (and `precision`, when asked): converting again into a workdir that holds one keeps it, so another
    source or other settings would otherwise be dropped without a word."""
    store = open_store(workdir)
    try:
        metadata = store.metadata()
    finally:
        store.close()
    if run_kind(metadata) != "serving":
        raise UserError(f"{workdir} already holds a {run_kind(metadata)} run, not a serving run: convert into a new "
                        f"--workdir")
    source = metadata.get("converted_from")
    if source is not None and Path(source) != Path(config.train.init_from).resolve():
        raise UserError(f"{workdir} already holds a serving run converted from {source}, not from "
                        f"train.init_from={config.train.init_from}: convert into a new --workdir")
    whole = read_yaml(workdir / "config.yaml", "the serving run's config")
    whole = whole if isinstance(whole, dict) else {}
    stored = {f"quant.{key}": value for key, value in (whole.get("quant") or {}).items()}
    wanted = {f"quant.{key}": value for key, value in config.to_dict()["quant"].items()}
    if precision is not None:
        stored["train.precision"] = (whole.get("train") or {}).get("precision")
        wanted["train.precision"] = precision
    changed = [key for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
    if changed:
        shown = ", ".join(f"{key}={stored.get(key)!r} (asked {wanted.get(key)!r})" for key in changed)
        raise UserError(f"{workdir} already holds a serving run made with {shown}: convert into a new --workdir "
                        f"(train.generate --numerics / --per-channel-int8 choose how a run is served)")


def remove_if_untouched(workdir: Path) -> None:
    """Delete `workdir` when it holds nothing but the lock file and empty folders (a run refused before it wrote
    anything); leave it as it is otherwise."""
    files = [p for p in workdir.rglob("*") if not p.is_dir()]
    if all(p == workdir / LOCK_NAME for p in files):
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
