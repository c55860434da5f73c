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
    if config.finetune.method == "lora":
        from train.finetune import lora_matmul
        matmul = lora_matmul(config, matmul)
    return Transformer(config.model, dtype=compute_dtype(config.train.precision), matmul=matmul)


def build_optimizer(config: Config):
    """The run's optax transformation: AdamW with its schedule, with `finetune.freeze` params left fixed."""
    from train.finetune import with_frozen
    return with_frozen(make_optimizer(config.train), config.finetune.freeze)


def state_initializer(config: Config, model: Transformer, frozen=None):
    """A zero-argument function that builds a fresh TrainState (use under jit, or eval_shape for restores)."""
    return functools.partial(init_state, model, build_optimizer(config), config.model.seq_len,
                             config.train.seed, config.train.precision == "fp16", frozen)


def abstract_state(config: Config, model: Transformer, frozen=None):
    return jax.eval_shape(state_initializer(config, model, frozen))
