"""`python -m quant.merge --workdir runs/finetune_int4_lora --out runs/finetune_int4_lora_merged`: fold a LoRA run's
adapters into its integer base (the math is `quant.lora_merge`), write the result as a serving run in the same format
as `quant.convert`, so generate/evaluate read it like any other, and print what the re-quantization costs.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import dataclasses
from pathlib import Path

import jax

from checkpoints.manager import tree_bytes
from quant.lora import split_adapters
from quant.lora_merge import format_rows, logits_error, merge_adapters
from train.build import build_model
from train.cli import ArgumentParser, add_base_argument, main_guard, positive_int, require_one_process, path_arg
from train.config import FinetuneConfig
from train.data import eval_batches, load_splits
from train.evaluation import check_batch_fits, eval_windows, mean_loss
from train.run import load_run, new_run_folder, write_serving_run
from train.steps import make_eval_step, split_variables


def merge_workdir(workdir: Path, out: Path, batches: int = 20, batch_size: int = 16, log=print,
                  base: Path | None = None) -> dict:
    """Merge the LoRA run in `workdir` into a serving run in `out`; returns the per-layer rows, the logits errors and
    the validation losses of base, base + adapters and merged model on the LoRA run's (target) validation split.
    UserError if `workdir` is not a LoRA run, `out` is not a new, empty folder or a batch of `batch_size` windows
    cannot fit in memory (one line naming --batch-size, before anything is written). `base`: where the LoRA run's base
    is now, if it moved (its fingerprint is checked)."""
    workdir, out = Path(workdir), Path(out)
    with new_run_folder(workdir, out) as folder:
        return _merge(workdir, out, folder, batches, batch_size, log, base)


def _merge(workdir: Path, out: Path, folder: Path, batches: int, batch_size: int, log,
           base_path: Path | None) -> dict:
    refused = {kind: f"it has no adapters to merge ({hint})" for kind, hint in (
        ("float", "quantize it with python -m quant.convert"), ("qat", "quantize it with python -m quant.convert"),
        ("imported", "quantize it with python -m quant.convert"), ("serving", "evaluate or generate with it as it is"))}
    run = load_run(workdir, base=base_path, refuse=refused)
    config = dataclasses.replace(run.config, finetune=FinetuneConfig())  # the merged model is a plain serving one
    splits = load_splits(config.data, run.tokenizer)
    check_batch_fits(run, splits.val, batch_size, "--batch-size", f"merging {workdir}")
    seq_len = config.model.seq_len
    x, _ = next(eval_batches(splits.val, batch_size, seq_len, 1))
    merged, rows = merge_adapters(config.model, config.quant, run.variables, run.config.finetune.lora_alpha, x[:1])
    model = build_model(config)
    base = {**run.variables, "params": split_adapters(run.variables["params"])[1]}  # the frozen base alone
    serve, serve_loss = jax.jit(model.apply), jax.jit(make_eval_step(model))  # base and merged alike
    lora_logits, _ = jax.jit(run.model.apply)(run.variables, x)
    errors = {"merged_vs_adapted": logits_error(lora_logits, serve(merged, x)[0]),
              "base_vs_adapted": logits_error(lora_logits, serve(base, x)[0])}
    losses = {name: mean_loss(step, *split_variables(v), splits.val, batch_size, seq_len, batches)
              for name, step, v in (("base", serve_loss, base),
                                    ("base + adapters", jax.jit(make_eval_step(run.model)), run.variables),
                                    ("merged", serve_loss, merged))}

    write_serving_run(folder, config, run.step, merged, splits, merged_from=str(workdir.resolve()),
                      base=run.metadata["base"])

    log(format_rows(rows))
    for name, e in errors.items():
        log(f"logits {name.replace('_', ' ')}: rel err {e['rel_err']:.4f} | max abs {e['max_abs']:.4f} | "
            f"top-1 agreement {100 * e['top1_agree']:.1f}%")
    log("validation loss on the fine-tuning data: " + " | ".join(f"{k} {v:.4f}" for k, v in losses.items())
        + f" | over {eval_windows(splits.val, batch_size, seq_len, batches)}")
    note = merge_note(losses)
    if note:
        log(note)
    log(f"merged {workdir} (step {run.step}) -> {out}: {tree_bytes(merged)['total']:,} parameter bytes")
    return {"rows": rows, "logits": errors, "val_loss": losses}


def merge_note(losses: dict[str, float]) -> str | None:
    """A note when the merged run kept less than half of what fine-tuning gained on the target data (validation
    losses in nats: "base", "base + adapters", "merged"), else None. Re-quantizing base + adapters rounds every
    update smaller than half a quantization step away, which at INT4 can be most of a small fine-tune's."""
    gain = losses["base"] - losses["base + adapters"]
    kept = losses["base"] - losses["merged"]
    if not gain > 0 or kept >= gain / 2:
        return None
    return (f"note: the merged run keeps {100 * max(kept, 0) / gain:.0f}% of the fine-tune's gain ({gain:.4f} nats; "
            f"merged {losses['merged']:.4f} against base {losses['base']:.4f}): re-quantizing rounded most of the "
            f"adapters' update away. The LoRA run itself (train.generate and train.evaluate read it) keeps all of "
            f"it; a base with more bits, or more fine-tuning, keeps more of it after a merge")


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m quant.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=path_arg, required=True, help="a LoRA run (finetune.method=lora)")
    parser.add_argument("--out", type=path_arg, required=True, help="folder for the merged serving run")
    parser.add_argument("--batches", type=positive_int, default=20, help="validation batches for the loss comparison")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="validation windows per batch for the loss comparison (default 16)")
    add_base_argument(parser)
    args = parser.parse_args(argv)
    require_one_process("python -m quant.merge")
    merge_workdir(args.workdir, args.out, args.batches, args.batch_size, base=args.base)


if __name__ == "__main__":
    main()
