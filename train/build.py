"""Turn a resolved `Config` into the objects a run needs: the model (its matmuls from `quant/`: AQT for QAT and
serving, LoRA adapters over them for finetune.method=lora), the optimizer, and a fresh TrainState.
"""
from __future__ import annotations

import functools

import jax

from quant.lora import LoraProvider, target_layers
from quant.provider import make_matmul
from slm_jax.errors import UserError
from slm_jax.layers import MatmulProvider
from slm_jax.model import Transformer
from train.config import Config
from train.finetune import with_frozen
from train.optim import make_optimizer
from train.precision import compute_dtype
from train.steps import init_state


def build_model(config: Config, mode: str | None = None) -> Transformer:
    """The Transformer of `config`; `mode` (none | qat | convert | serve) overrides `config.quant.mode`.
    UserError for a LoRA config whose quantization is not a serving one, or whose targets match no layer."""
    mode = mode or config.quant.mode
    matmul = None if mode == "none" else make_matmul(config.model, config.quant, mode)
    if config.finetune.method == "lora":
        matmul = lora_matmul(config, matmul)
    return Transformer(config.model, dtype=compute_dtype(config.train.precision), matmul=matmul)


def lora_matmul(config: Config, base_matmul: MatmulProvider | None) -> LoraProvider:
    """The provider of a LoRA run's model: adapters on `finetune.lora_targets` over the base's (serving) provider."""
    ft = config.finetune
    if base_matmul is None or config.quant.mode != "serve":
        raise UserError(f"finetune.method=lora trains over a serving (integer) model, but quant.mode is "
                        f"{config.quant.mode}; point finetune.base at a converted workdir")
    targets = target_layers(config.model, ft.lora_targets)
    if not targets:
        raise UserError(f"finetune.lora_targets {ft.lora_targets!r} matches no weight layer (layer paths look "
                        f"like: layer_0/attn/q, layer_0/mlp/up, lm_head)")
    return LoraProvider(base_matmul, targets, ft.lora_rank, ft.lora_alpha, ft.lora_dropout)


def build_optimizer(config: Config):
    """The run's optax transformation: AdamW with its schedule, with `finetune.freeze` params left fixed."""
    return with_frozen(make_optimizer(config.train), config.finetune.freeze)


def state_initializer(config: Config, model: Transformer, frozen=None):
    """A zero-argument function that builds a fresh TrainState (use under jit, or eval_shape for restores)."""
    return functools.partial(init_state, model, build_optimizer(config), config.model.seq_len,
                             config.train.seed, config.train.precision == "fp16", frozen)


def abstract_state(config: Config, model: Transformer, frozen=None):
    """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves): a restore target."""
    return jax.eval_shape(state_initializer(config, model, frozen))
