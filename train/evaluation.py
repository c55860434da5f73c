"""Validation loss, perplexity and bits per character, computed the same way for every kind of model and run."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from checkpoints.manager import tree_bytes
from slm_jax.errors import UserError
from train.data import DataConfig, eval_starts, load_splits, windows
from train.run import load_run
from train.steps import make_eval_step, split_variables


def mean_loss(eval_step, variables_params, frozen, tokens: np.ndarray, batch_size: int, seq_len: int,
              max_batches: int, place=None) -> float:
    """Average next-token loss over deterministic windows of `tokens` (eval_step is jitted by the caller).
    `place(starts)` -> (inputs, targets) puts a batch whose windows begin at `starts` on the devices (e.g. split
    along the mesh's data axis, each process reading its own rows); default: numpy arrays of the whole batch."""
    place = place or (lambda starts: windows(tokens, starts, seq_len))
    losses = [eval_step(variables_params, frozen, *place(starts))
              for starts in eval_starts(tokens, batch_size, seq_len, max_batches)]
    return float(np.mean(jax.device_get(losses)))


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> str:
    """How many windows a validation loss over `tokens` averages (the batches `mean_loss` really runs, fewer than
    `max_batches` on a short split), e.g. "20 batches x 16 windows x 32 tokens": every loss table and log line says
    it, so losses over different windows are never compared unawares."""
    starts = eval_starts(tokens, batch_size, seq_len, max_batches)
    return f"{len(starts)} batch{'es' if len(starts) != 1 else ''} x {len(starts[0])} windows x {seq_len} tokens"


def loss_summary(loss: float, chars_per_tok: float | None = 1.0) -> dict:
    """loss (nats/token) -> {'loss', 'perplexity', 'bits_per_char'}; bits_per_char is None when characters per
    token are unknown (pre-tokenized ids without a tokenizer), never a number in the wrong unit."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_char": loss / math.log(2) / chars_per_tok if chars_per_tok else None}


def format_bits_per_char(bits: float | None) -> str:
    """The log line's bits/char part; "n/a" when the run has no text (pre-tokenized ids, no tokenizer)."""
    return f"bits/char {bits:.3f}" if bits is not None else "bits/char n/a (pre-tokenized ids, no tokenizer)"


def evaluate_workdir(workdir: Path, batches: int, batch_size: int, data: DataConfig | None = None) -> dict:
    """Validation loss of any run in `workdir` on its own validation split, or on `data`'s (e.g. a fine-tuning
    target), tokenized by the run's own tokenizer: {'workdir', 'step', 'quant', 'loss', 'perplexity',
    'bits_per_char' (None without text), 'param_bytes', 'val_windows' (`eval_windows`)}. UserError if the loss is
    not finite (a NaN is never a result)."""
    run = load_run(workdir)
    splits = load_splits(data or run.config.data, run.tokenizer)
    loss = mean_loss(jax.jit(make_eval_step(run.model)), *split_variables(run.variables), splits.val, batch_size,
                     run.config.model.seq_len, batches)
    if not math.isfinite(loss):
        raise UserError(f"the validation loss of {workdir} (step {run.step}) is {loss}: its model overflows on this "
                        f"data (precision {run.config.train.precision}); try train.precision=fp32 or another step")
    return {"workdir": str(workdir), "step": run.step, "quant": run.config.quant.mode,
            **loss_summary(loss, splits.chars_per_token),
            "param_bytes": tree_bytes(run.variables)["total"],
            "val_windows": eval_windows(splits.val, batch_size, run.config.model.seq_len, batches)}


def format_bits(value: float | None) -> str:
    """bits/char as a table cell: 4 decimals, or "n/a" when unknown (pre-tokenized ids without a tokenizer)."""
    return f"{value:.4f}" if value is not None else "n/a"


def format_table(rows: list[dict]) -> str:
    """`evaluate_workdir` rows as an aligned text table, one line per run, then the validation windows the losses
    average (one line when all runs used the same, else one per run)."""
    header = f"{'workdir':<28} {'step':>6} {'quant':>6} {'val loss':>9} {'ppl':>8} {'bits/char':>9} {'param MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['workdir']:<28} {r['step']:>6} {r['quant']:>6} {r['loss']:>9.4f} {r['perplexity']:>8.3f} "
                     f"{format_bits(r['bits_per_char']):>9} {r['param_bytes'] / 1e6:>9.3f}")
    if len({r["val_windows"] for r in rows}) == 1:
        lines.append(f"val loss over {rows[0]['val_windows']} of each run's validation split")
    else:
        lines += [f"val loss of {r['workdir']} over {r['val_windows']}" for r in rows]
    return "\n".join(lines)
