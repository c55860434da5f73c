"""`python -m train.evaluate --workdir runs/baseline [--workdir runs/int8_qat ...]`: validation loss,
perplexity and bits per character; several workdirs give a side-by-side table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax

from checkpoints.manager import tree_bytes
from train.cli import main_guard
from train.data import ByteTokenizer, DataConfig, load_splits
from train.evaluation import chars_per_token, loss_summary, mean_loss
from train.steps import make_eval_step, split_variables
from train.workdir import load_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--workdir", type=Path, action="append", required=True, help="repeat to compare runs")
    parser.add_argument("--batches", type=int, default=50, help="validation batches per run")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


def evaluate_workdir(workdir: Path, batches: int, batch_size: int, data: DataConfig | None = None) -> dict:
    """Validation loss of `workdir` on its own validation split, or on `data`'s (e.g. a fine-tuning target)."""
    run = load_run(workdir)
    tokenizer = ByteTokenizer()
    splits = load_splits(data or run.config.data, tokenizer)
    loss = mean_loss(jax.jit(make_eval_step(run.model)), *split_variables(run.variables), splits.val, batch_size,
                     run.config.model.seq_len, batches)
    return {"workdir": str(workdir), "step": run.step, "quant": run.config.quant.mode,
            **loss_summary(loss, chars_per_token(tokenizer.decode, splits.val)),
            "param_bytes": tree_bytes(run.variables)["total"]}


def format_table(rows: list[dict]) -> str:
    header = f"{'workdir':<28} {'step':>6} {'quant':>6} {'val loss':>9} {'ppl':>8} {'bits/char':>9} {'param MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['workdir']:<28} {r['step']:>6} {r['quant']:>6} {r['loss']:>9.4f} {r['perplexity']:>8.3f} "
                     f"{r['bits_per_char']:>9.4f} {r['param_bytes'] / 1e6:>9.3f}")
    return "\n".join(lines)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    rows = [evaluate_workdir(w, args.batches, args.batch_size) for w in args.workdir]
    print(format_table(rows))


if __name__ == "__main__":
    main()
