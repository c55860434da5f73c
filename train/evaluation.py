"""Validation loss, perplexity and bits per character, computed the same way for every kind of model and run."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from checkpoints.manager import tree_bytes
from train.data import ByteTokenizer, DataConfig, eval_batches, load_splits
from train.run import load_run
from train.steps import make_eval_step, split_variables


def mean_loss(eval_step, variables_params, frozen, tokens: np.ndarray, batch_size: int, seq_len: int,
              max_batches: int) -> float:
    """Average next-token loss over deterministic windows of `tokens` (eval_step is jitted by the caller)."""
    losses = [eval_step(variables_params, frozen, x, y) for x, y in eval_batches(tokens, batch_size, seq_len,
                                                                                  max_batches)]
    return float(np.mean(jax.device_get(losses)))


def chars_per_token(decode, tokens: np.ndarray, sample: int = 200_000) -> float:
    """Characters per token of a split (bytes-level tokens of UTF-8 text give slightly more tokens than chars)."""
    head = np.asarray(tokens[:sample])
    return len(decode(head)) / max(len(head), 1)


def loss_summary(loss: float, chars_per_tok: float = 1.0) -> dict:
    """loss (nats/token) -> {'loss', 'perplexity', 'bits_per_char'}."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_char": loss / math.log(2) / chars_per_tok}


def evaluate_workdir(workdir: Path, batches: int, batch_size: int, data: DataConfig | None = None) -> dict:
    """Validation loss of any run in `workdir` on its own validation split, or on `data`'s (e.g. a fine-tuning
    target): {'workdir', 'step', 'quant', 'loss', 'perplexity', 'bits_per_char', 'param_bytes'}."""
    run = load_run(workdir)
    tokenizer = ByteTokenizer()
    splits = load_splits(data or run.config.data, tokenizer)
    loss = mean_loss(jax.jit(make_eval_step(run.model)), *split_variables(run.variables), splits.val, batch_size,
                     run.config.model.seq_len, batches)
    return {"workdir": str(workdir), "step": run.step, "quant": run.config.quant.mode,
            **loss_summary(loss, chars_per_token(tokenizer.decode, splits.val)),
            "param_bytes": tree_bytes(run.variables)["total"]}


def format_table(rows: list[dict]) -> str:
    """`evaluate_workdir` rows as an aligned text table, one line per run."""
    header = f"{'workdir':<28} {'step':>6} {'quant':>6} {'val loss':>9} {'ppl':>8} {'bits/char':>9} {'param MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['workdir']:<28} {r['step']:>6} {r['quant']:>6} {r['loss']:>9.4f} {r['perplexity']:>8.3f} "
                     f"{r['bits_per_char']:>9.4f} {r['param_bytes'] / 1e6:>9.3f}")
    return "\n".join(lines)
