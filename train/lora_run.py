"""LoRA's parameter partition: the adapters train (they alone have optimizer state and are checkpointed), the base
serving run they sit on stays frozen and is named in each adapter checkpoint by a fingerprint of its weights.

Opening a base and restoring a LoRA run are `train.run`'s job; making, sharding and saving the adapters' state is
`train.recipe.LoraRecipe`'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints.manager import key_path_str, param_count
from quant.lora import adapters_by_layer, split_adapters
from quant.plan import path_str
from slm_jax.errors import UserError
from train.build import build_optimizer, state_initializer
from train.config import Config
from train.steps import TrainState


def fingerprint(variables: Any) -> str:
    """sha256 (hex) over every array of a model's variables: path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(jax.device_get(leaf))
        h.update(f"{key_path_str(path)}|{array.dtype.name}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class LoraBase:
    """The frozen serving run that LoRA adapters train on, and what an adapter checkpoint records about it."""

    path: Path
    step: int
    fingerprint: str
    config: Config  # the base's own Config
    variables: dict  # {"params": float embeddings and norms, "aqt": integer weights and scales}

    def run_config(self, config: Config) -> Config:
        """`config` with the base's model and quant sections: the base is the one source of truth for both."""
        return dataclasses.replace(config, model=self.config.model, quant=self.config.quant)

    def record(self) -> dict:
        return {"path": str(self.path), "step": self.step, "fingerprint": self.fingerprint}

    def check(self, recorded: dict | None, where) -> None:
        """UserError unless this is the base the adapters in `where` were trained on."""
        recorded = recorded or {}
        if recorded.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"the adapters in {where} were trained on base {recorded.get('path')} (step {recorded.get('step')}, "
                f"fingerprint {str(recorded.get('fingerprint'))[:12]}), but {self.path} holds step {self.step} "
                f"(fingerprint {self.fingerprint[:12]}); use the base they were trained on")


def rank_note(adapters: dict, rank: int, model_params: int) -> str | None:
    """A one-line note when `rank` (finetune.lora_rank) is at least the smaller dimension, min(in, out), of a
    target layer: an update A [in, r] @ B [r, out] can never have rank above min(in, out), so such an adapter
    learns nothing a full update of the layer could not, with more parameters (r * (in + out) > in * out) and no
    saving over training the layer itself. None when the rank is below every target's smaller dimension.

    adapters: the adapters' "params" tree (`quant.lora.split_adapters`; arrays or shape structs); model_params:
    the base model's parameter count, for scale. The rank is allowed, as PEFT libraries allow it: a note, not an
    error (the training is valid, only wasteful)."""
    sizes = {path_str(path): (adapter["lora_a"].shape[0], adapter["lora_b"].shape[-1])  # (in, out)
             for path, adapter in adapters_by_layer(adapters).items()}
    full = {path: size for path, size in sizes.items() if rank >= min(size)}
    if not full:
        return None
    largest = min(min(size) for size in sizes.values()) - 1
    path, (fan_in, out) = next(iter(full.items()))
    others = f" and {len(full) - 1} other target layer{'s' if len(full) > 2 else ''}" if len(full) > 1 else ""
    return (f"note: finetune.lora_rank {rank} is at least the smaller dimension of {path} ({fan_in} x {out}){others}, "
            f"so an adapter there is a full-rank update with more parameters than its layer; the largest useful rank "
            f"here is {largest} ({param_count(adapters):,} adapter parameters for a {model_params:,}-parameter model)")


def lora_initializer(config: Config, model):
    """A zero-argument function building a fresh adapter-only TrainState (frozen left empty): jit it, or
    eval_shape it for a restore target. The RNG and init follow `train.build.state_initializer`."""
    init, tx = state_initializer(config, model), build_optimizer(config)

    def initialize() -> TrainState:
        state = init()  # the unused float copies it initialises are dropped by XLA under jit
        adapters, _ = split_adapters(state.params)
        return state.replace(params=adapters, opt_state=tx.init(adapters), frozen={})

    return initialize
