"""`python -m checkpoints.inspect DIR [--step N] [--verify]`: what a checkpoint holds, without building a model.

DIR is a workdir, its checkpoints folder, or one step folder. Prints the metadata, the steps present and every
array of the saved state (read from Orbax's metadata, not restored), with bytes by dtype. `--verify` also checks
the metadata against the CRC-32 it recorded of itself, reads every array whole and compares its bytes with the
CRC-32s recorded when the step was saved: the whole array's, or each shard's for a save by several processes (exit 2
when one differs or cannot be read). Without --verify, metadata edited since the save is shown as it is.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse
from pathlib import Path

from checkpoints.hf import import_first, is_model_folder
from checkpoints.lock import rotated_away
from checkpoints.manager import METADATA_CHECKSUM_KEY, SHARD_CHECKSUM_KEY, ArrayInfo, CheckpointStore
from slm_jax.errors import UserError
from train.cli import ArgumentParser, main_guard, non_negative_int, path_arg
from train.run import VANISHED_STEP_RETRIES, vanished

# The config keys worth a line each; a section not listed here is summarised in full. `applied_keys` then drops
# those the run's own settings left unused.
SUMMARY_KEYS = {
    "train": ("steps", "batch_size", "grad_accum", "learning_rate", "precision", "seed"),
    "quant": ("mode", "weight_bits", "act_bits", "granularity", "group_size", "bwd_bits", "embed_bits", "scale_dtype"),
    "data": ("path", "tokenizer", "vocab_size", "val_fraction", "val_plays", "genres"),
}
BUNDLED_ONLY = ("val_plays", "genres")  # choose plays of the bundled corpus (train.data.DataConfig)
LORA_ONLY = ("base", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # finetune.method=lora


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m checkpoints.inspect", description=__doc__)
    parser.add_argument("dir", type=path_arg, help="a workdir, its checkpoints/ folder, or one step folder in it")
    parser.add_argument("--step", type=non_negative_int, help="which step (default: the latest)")
    parser.add_argument("--verify", action="store_true",
                        help="check the metadata and every array (read whole) against the CRC-32s recorded at save")
    return parser.parse_args(argv)


def locate(path: Path) -> tuple[Path, int | None]:
    """(checkpoints folder, step named by the path or None) for a workdir, checkpoints folder or step folder."""
    if path.is_file():
        raise UserError(f"{path} is a file, not a run folder (give a workdir, its checkpoints/ folder or one step "
                        f"folder in it)")
    if not path.is_dir():
        raise UserError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if any(child.name.isdigit() and child.is_dir() for child in path.iterdir()):
        return path, None
    if is_model_folder(path):
        raise import_first(path)
    raise UserError(f"{path} is not a run directory or a checkpoints folder (no checkpoints/ or step folders in it)")


def _value(key: str, value) -> str:
    """A config value as `inspect` prints it: lists joined by commas; the data section's empty genres mean all."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or ("all" if key == "genres" else "none")
    return str(value)


def applied_keys(section: str, values: dict, data: dict) -> tuple[str, ...]:
    """The keys of config `section` worth a line that applied to the run: a float run's quant mode alone; the
    bundled corpus's val_plays and genres only without data.path; val_fraction only for text data.path split
    (not the bundled plays, nor pre-tokenized ids: `data`, the checkpoint's data description, says so); a
    vocab_size only when set (bpe, pre-tokenized ids); LoRA's settings only for finetune.method=lora, freeze
    only for the others. A run trained on the user's text showed the default val_plays and genres as if used."""
    keys = SUMMARY_KEYS.get(section, tuple(values))
    unused: tuple[str, ...] = ()
    if section == "quant" and values.get("mode") == "none":
        keys = ("mode",)
    elif section == "data":
        unused = ("val_fraction",) if values.get("path") is None else \
            BUNDLED_ONLY + (("val_fraction",) if data.get("pretokenized") else ())
        unused += ("vocab_size",) if values.get("vocab_size") is None else ()
    elif section == "finetune":
        unused = ("freeze",) if values.get("method") == "lora" else LORA_ONLY
    return tuple(key for key in keys if key not in unused)


def config_summary(config: dict, data: dict | None = None) -> list[str]:
    """One line per config section with the keys that applied (`applied_keys`); `data`: the checkpoint's data
    description (its `data` metadata), None when not recorded."""
    lines = []
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        keys = applied_keys(section, values, data or {})
        shown = " ".join(f"{k}={_value(k, values[k])}" for k in keys if k in values and values[k] != {})
        lines.append(f"  {section:<11} {shown}")
    return lines


def plan_lines(plan: dict | None, quant_mode: str | None) -> list[str]:
    """One row per layer of a recorded quantization plan (`quant.plan.plan_to_json`)."""
    if not plan:
        return ["quant plan  none (float)" if quant_mode in (None, "none")
                else "quant plan  not recorded (e.g. a format-1 checkpoint); the config's quant section applies"]
    bits = lambda b: "float" if b is None else f"int{b}"
    rows = [("layer", "weights", "activations", "scales", "gradients")]
    for layer, p in plan.items():
        if p is None:
            rows.append((layer, "float", "float", "-", "float"))
            continue
        scales = f"per_group({p.get('group_size')})" if p.get("granularity") == "per_group" else p.get("granularity")
        rows.append((layer, bits(p.get("weight_bits")), bits(p.get("act_bits")), str(scales), bits(p.get("bwd_bits"))))
    return ["quant plan", *table(rows)]


def table(rows: list[tuple], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of cells as aligned text (columns in `right` right-aligned), a rule under the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return ["  " + fmt(rows[0]), "  " + "  ".join("-" * w for w in widths),
            *("  " + fmt(row) for row in rows[1:])]


def array_lines(arrays: list[ArrayInfo]) -> list[str]:
    rows = [("path", "shape", "dtype", "bytes")]
    rows += [(a.path, str(list(a.shape)), a.dtype.name, f"{a.nbytes:,}") for a in arrays]
    by_dtype: dict[str, int] = {}
    for a in arrays:
        by_dtype[a.dtype.name] = by_dtype.get(a.dtype.name, 0) + a.nbytes
    totals = " | ".join(f"{name} {n:,}" for name, n in sorted(by_dtype.items()))
    return [f"state arrays ({len(arrays)})", *table(rows, right=(3,)),
            f"bytes by dtype: {totals} | total {sum(by_dtype.values()):,}"]


def provenance_lines(metadata: dict) -> list[str]:
    """Where a serving run came from (`converted_from`, `converted_from_step`) and how it was quantized (`ptq`:
    method, calibration, settings, seconds, and its note when it made one), when recorded."""
    lines = []
    if metadata.get("converted_from"):
        step = metadata.get("converted_from_step")
        lines.append(f"converted   from {metadata['converted_from']}" + (f" (step {step})" if step is not None else ""))
    ptq = metadata.get("ptq") or {}
    if ptq:
        calib = ptq.get("calibration")
        used = (f", calibrated on {calib['sequences']} x {calib['seq_len']} {calib['split']} tokens (seed "
                f"{calib.get('seed')})" if calib else "")
        settings = "; ".join(f"{name} {values}" for name, values in (ptq.get("settings") or {}).items())
        took = f", {ptq['seconds']} s" if "seconds" in ptq else ""
        lines.append(f"ptq         method {ptq.get('method')}{used}{took}" + (f"; {settings}" if settings else ""))
        if ptq.get("note"):  # e.g. GPTQ's rank-deficient calibration (quant.ptq_methods.gptq_rank_note)
            lines.append(f"ptq note    {ptq['note'].removeprefix('note: ')}")
    return lines


def describe(metadata: dict, steps: list[int], arrays: list[ArrayInfo], where: str) -> str:
    migrated = metadata.get("migrated_from")
    tokenizer, config = metadata.get("tokenizer") or {}, metadata.get("config") or {}
    param_bytes = (metadata.get("param_bytes") or {}).get("total", 0)
    lines = [
        f"checkpoint  {where}",
        f"steps       {', '.join(map(str, steps))}",
        f"format      {metadata['format_version']}" + (f" (read from format {migrated})" if migrated else ""),
        f"kind        {metadata.get('kind')}",
        f"step        {metadata.get('step')}",
        f"created     {metadata.get('created')} by slm-jax {metadata.get('project_version')}",
        f"tokenizer   {', '.join(f'{k} {v}' for k, v in tokenizer.items())}",
        f"params      {metadata.get('param_count', 0):,} ({param_bytes:,} bytes)",
        *provenance_lines(metadata),
        "config",
        *config_summary(config, metadata.get("data") if isinstance(metadata.get("data"), dict) else None),
        *plan_lines(metadata.get("quant_plan"), (config.get("quant") or {}).get("mode")),
        *array_lines(arrays),
    ]
    return "\n".join(lines)


def verify_summary(checked: int | None, metadata: dict) -> str:
    """What `--verify` found, after `CheckpointStore.verify` returned `checked` (arrays compared, None: no checksums)
    for the step whose `metadata` this is (a verify that returns has found the metadata matching its CRC-32, if it
    recorded one)."""
    if not checked:
        arrays = "no checksums recorded (saved before slm-jax recorded them)"
    elif metadata.get(SHARD_CHECKSUM_KEY):
        blocks = sum(len(crcs) for crcs in metadata[SHARD_CHECKSUM_KEY].values() if isinstance(crcs, dict))
        arrays = f"{checked} match the CRC-32s recorded at save for their {blocks} shards (saved by several processes)"
    else:
        arrays = f"{checked} match the CRC-32 recorded at save"
    if METADATA_CHECKSUM_KEY in metadata:
        return f"{arrays}, and the metadata matches its own"
    return arrays if not checked else f"{arrays}; the metadata is unchecked (saved before slm-jax recorded its CRC-32)"


@main_guard
def main(argv=None):
    args = parse_args(argv)
    directory, step = locate(args.dir)
    if step is not None and args.step is not None and args.step != step:
        raise UserError(f"{args.dir} is the folder of step {step}, but --step {args.step} was given: name the "
                        f"checkpoints folder {directory} with --step, or one step folder without it")
    step = args.step if args.step is not None else step
    for attempt in range(VANISHED_STEP_RETRIES + 1):
        store, shown = CheckpointStore(directory, create=False), False
        chosen = step if step is not None else store.latest_step()
        try:
            metadata, arrays = store.metadata(chosen, checked=False), store.arrays(chosen)
            print(describe(metadata, store.steps(), arrays, f"{store.directory}/{chosen}"))
            shown = True
            if args.verify:
                print(f"verified    every array read; {verify_summary(store.verify(chosen), metadata)}")
            return
        except Exception:
            if not rotated_away(store.directory, chosen):
                raise
            if step is not None or shown or attempt == VANISHED_STEP_RETRIES:
                raise vanished(store, chosen) from None
            # the latest step was deleted by the run training there (checkpoint.keep): read the new latest
        finally:
            store.close()


if __name__ == "__main__":
    main()
