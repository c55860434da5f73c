"""Calibration for the PTQ methods: which training tokens they see, and the per-layer input statistics (Hessian
X^T X, mean and max of |x| per channel) gathered through the model's layer hooks, summed over batches so no
activation is ever held beyond one chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quant.config import QuantConfig
from quant.hooks import HookContext, LayerHook
from quant.plan import Path, path_str
from quant.provider import make_matmul
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.model import Transformer

STATS = "calibration_stats"


def calibration_tokens(train_tokens: np.ndarray, sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """`sequences` distinct, non-overlapping windows of `seq_len` tokens from the training split, chosen by `seed`
    (the same seed gives the same windows). Returns int32 [sequences, seq_len].

    Raises UserError when the split holds fewer than `sequences` windows or the sizes are not positive.
    """
    if sequences <= 0 or seq_len <= 0:
        raise UserError(f"calibration needs a positive number of batches and length, got {sequences:,} x {seq_len:,}")
    windows = len(train_tokens) // seq_len
    if sequences > windows:
        raise UserError(f"--calib-batches {sequences:,} x --calib-seq-len {seq_len:,} needs {sequences * seq_len:,} "
                        f"tokens, but the training split holds {len(train_tokens):,} ({windows:,} windows)")
    starts = np.sort(np.random.default_rng(seed).choice(windows, sequences, replace=False)) * seq_len
    return np.stack([np.asarray(train_tokens[s:s + seq_len], np.int32) for s in starts])


@dataclasses.dataclass
class InputStats:
    """Statistics of one layer's input x over `tokens` calibration tokens (float64 sums on the host)."""

    xtx: np.ndarray  # [in, in] sum over tokens of x^T x
    abs_sum: np.ndarray  # [in] sum over tokens of |x|
    abs_max: np.ndarray  # [in] max over tokens of |x|
    tokens: int

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's H = 2 X^T X / tokens [in, in] (the Hessian of the mean squared output error in the weights)."""
        return 2 * self.xtx / self.tokens

    @property
    def mean_abs(self) -> np.ndarray:
        """[in] mean |x| per input channel (AWQ's activation salience)."""
        return self.abs_sum / self.tokens

    def add(self, other: "InputStats") -> "InputStats":
        return InputStats(self.xtx + other.xtx, self.abs_sum + other.abs_sum,
                          np.maximum(self.abs_max, other.abs_max), self.tokens + other.tokens)


def input_stats_hook(paths: Sequence[Path], collection: str = STATS) -> LayerHook:
    """A hook that sows, for each layer in `paths`, its input's x^T x, sum |x| and max |x| over the batch's tokens
    into `collection` (apply with mutable=[collection])."""
    def fn(ctx: HookContext, x, kernel, next_dot):
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        ctx.module.sow(collection, "xtx", jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST))
        ctx.module.sow(collection, "abs_sum", jnp.sum(jnp.abs(flat), axis=0))
        ctx.module.sow(collection, "abs_max", jnp.max(jnp.abs(flat), axis=0))
        return next_dot(x, kernel)

    return LayerHook("^(" + "|".join(re.escape(path_str(p)) for p in paths) + ")$", fn)


def collect_input_stats(model_cfg: ModelConfig, quant_cfg: QuantConfig, variables: dict, tokens: np.ndarray,
                        paths: Sequence[Path], chunk: int = 16) -> dict[Path, InputStats]:
    """Run the model (float with quant_cfg.mode "none", the serving model with "serve") on tokens [n, seq] int in
    chunks of `chunk` sequences and return each listed weight layer's input statistics.

    With a serving model and its integer weights, each layer sees the inputs that the quantized layers before it
    produce: the sequential calibration of GPTQ. The compiled forward pass is cached per (configs, paths), so
    calling again with new variables of the same structure does not compile again.
    """
    apply = _stats_fn(model_cfg, quant_cfg, tuple(paths))
    totals: dict[Path, InputStats] = {}
    for start in range(0, len(tokens), chunk):
        sown = apply(variables, tokens[start:start + chunk])
        for path in paths:
            node = sown
            for key in path + ("dot_general",):
                node = node[key]
            stats = InputStats(*(np.asarray(node[k][0], np.float64) for k in ("xtx", "abs_sum", "abs_max")),
                               tokens=int(np.prod(tokens[start:start + chunk].shape)))
            totals[path] = totals[path].add(stats) if path in totals else stats
    return totals


@functools.lru_cache(maxsize=8)
def _stats_fn(model_cfg: ModelConfig, quant_cfg: QuantConfig, paths: tuple[Path, ...]):
    """jit(variables, tokens [batch, seq] -> the sown statistics collection) for these layers."""
    model = Transformer(model_cfg, matmul=make_matmul(model_cfg, quant_cfg, hooks=(input_stats_hook(paths),)))
    return jax.jit(lambda v, t: model.apply(v, t, mutable=[STATS])[1][STATS])
