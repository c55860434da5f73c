"""Turn a resolved `Config` into the objects a run needs: the model (with its quantization) and the optimizer."""
from __future__ import annotations

import functools

import jax

from slm_jax.model import Transformer
from train.config import Config
from train.optim import make_optimizer
from train.precision import compute_dtype
from train.steps import init_state


def build_model(config: Config, mode: str | None = None) -> Transformer:
    """The Transformer of `config`; `mode` (none | qat | convert | serve) overrides `config.quant.mode`."""
    mode = mode or config.quant.mode
    matmul = None
    if mode != "none":
        from quant.provider import make_matmul
        matmul = make_matmul(config.model, config.quant, mode)
    return Transformer(config.model, dtype=compute_dtype(config.train.precision), matmul=matmul)


def state_initializer(config: Config, model: Transformer, frozen=None):
    """A zero-argument function that builds a fresh TrainState (use under jit, or eval_shape for restores)."""
    return functools.partial(init_state, model, make_optimizer(config.train), config.model.seq_len,
                             config.train.seed, config.train.precision == "fp16", frozen)


def abstract_state(config: Config, model: Transformer, frozen=None):
    return jax.eval_shape(state_initializer(config, model, frozen))
