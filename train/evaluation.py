"""Validation loss, perplexity and bits per character, computed the same way for every kind of model."""
from __future__ import annotations

import math

import jax
import numpy as np

from train.data import eval_batches


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
