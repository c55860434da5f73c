"""What a run trains, chosen once: `make_recipe(config)` gives the model, optimizer, state shardings, initial (or
resumed) state and checkpoint contents of either full training (every param; from scratch, from `train.init_from`,
or continued QAT with `finetune.freeze`) or LoRA (adapters over a frozen serving base). The training loop calls only
the recipe, so it never asks which fine-tuning method runs.
"""
from __future__ import annotations

from pathlib import Path

import jax

from checkpoints.manager import CheckpointStore, param_count
from slm_jax.model import Transformer
from train.build import build_model, build_optimizer, state_initializer
from train.config import Config
from train.data import check_inherited_tokenizer
from train.lora_run import LoraBase, lora_initializer, rank_note
from train.run import load_params, open_lora_base, tokenizer_of, with_model_of, with_tokenizer_of
from train.sharding import (abstract_with_shardings, create_sharded_state, logical_axes, put_replicated_copy,
                            state_shardings, tree_shardings)
from train.steps import TrainState


class FullRecipe:
    """Every param trains; the checkpoint holds the whole TrainState."""

    def __init__(self, config: Config):
        if config.train.init_from:  # the starting run's shape is the one source of truth (imported models too)
            config = with_model_of(Path(config.train.init_from), config)
        self.config = config
        self.model = build_model(config)
        self.optimizer = build_optimizer(config)
        self.initializer = state_initializer(config, self.model)

    def shardings(self, mesh):
        """NamedShardings of the TrainState on `mesh`, from the model's logical axes."""
        return state_shardings(self.initializer, self.model, mesh)

    def initial_state(self, store: CheckpointStore, log, shardings) -> TrainState:
        """Restored from `store`'s latest step (resharded onto this run's mesh), or fresh, created directly in
        `shardings`, with params from `train.init_from` when set. The caller (train.loop) has already refused a
        store of another model (train.run.check_resumable)."""
        latest = store.latest_step()
        if latest is not None:
            log(f"resuming from step {latest} in {store.directory}")
            return store.restore(abstract_with_shardings(jax.eval_shape(self.initializer), shardings), latest)
        state = create_sharded_state(self.initializer, shardings)
        if self.config.train.init_from:
            params = put_replicated_copy(load_params(Path(self.config.train.init_from), self.config),
                                         shardings.params)
            opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
            log(f"initialised params from {self.config.train.init_from}")
        return state

    def inherited_tokenizer(self):
        """The tokenizer of `train.init_from`'s run, which this run keeps; None for a run of its own (the data
        section's tokenizer is then made, or trained, by `train.data.load_splits`). UserError if data.tokenizer
        names another one."""
        if not self.config.train.init_from:
            return None
        return _inherited(self.config, Path(self.config.train.init_from), "train.init_from")

    def checkpoint(self, state: TrainState, metadata: dict) -> tuple[TrainState, dict]:
        """What a step saves: the whole state, and `metadata` as it is."""
        return state, metadata


class LoraRecipe(FullRecipe):
    """Adapters train over a frozen serving base, which supplies the model and quant sections; the state's `frozen`
    holds the base, and checkpoints hold the adapters and their optimizer state only."""

    def __init__(self, config: Config, base: LoraBase):
        self.base = base
        super().__init__(with_tokenizer_of(base.path, base.run_config(config)))
        self.initializer = lora_initializer(self.config, self.model)

    def shardings(self, mesh):
        """NamedShardings of the LoRA TrainState, base included. The float model of the same config names every
        kernel's axes; integer weights and scales, and the adapters' A [in, r] and B [r, out], follow the kernel
        of their layer by shape (see `train.sharding.tree_shardings`)."""
        abstract = jax.eval_shape(self.initializer)
        abstract = abstract.replace(frozen=jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                  self.base.variables))
        return tree_shardings(abstract, logical_axes(Transformer(self.config.model)), mesh)

    def initial_state(self, store: CheckpointStore, log, shardings) -> TrainState:
        """The adapters' state, fresh or resumed from `store`, created in `shardings`, with the base attached as
        `frozen`. The state then owns the base's arrays: a train step that donates its state frees them. UserError
        if `store` holds adapters trained on another base."""
        own = shardings.replace(frozen={})
        latest = store.latest_step()
        if latest is None:
            state = create_sharded_state(self.initializer, own)
        else:
            self.base.check(store.metadata(latest).get("base"), store.directory)
            log(f"resuming adapters from step {latest} in {store.directory}")
            state = store.restore(abstract_with_shardings(jax.eval_shape(self.initializer), own), latest)
        note = rank_note(state.params, self.config.finetune.lora_rank, param_count(self.base.variables))
        if note:
            log(note)
        log(f"LoRA over {self.base.path} (step {self.base.step}): {param_count(state.params):,} adapter params on "
            f"{len(self.model.matmul.targets)} layers, {param_count(self.base.variables):,} frozen")
        return state.replace(frozen=put_replicated_copy(self.base.variables, shardings.frozen))

    def inherited_tokenizer(self):
        """The base's tokenizer, which the adapters keep; UserError if data.tokenizer names another one."""
        return _inherited(self.config, Path(self.config.finetune.base), "finetune.base")

    def checkpoint(self, state: TrainState, metadata: dict) -> tuple[TrainState, dict]:
        """The adapters and their optimizer state only, and metadata naming the base they belong to."""
        return state.replace(frozen={}), {**metadata, "kind": "lora", "base": self.base.record()}


def _inherited(config: Config, source: Path, key: str):
    tokenizer = tokenizer_of(source)
    check_inherited_tokenizer(config.data, tokenizer, f"{key}={source}")
    return tokenizer


def make_recipe(config: Config) -> FullRecipe:
    """The recipe `config` asks for; for LoRA this opens `finetune.base` (UserError if it is not a serving run)."""
    if config.finetune.method == "lora":
        return LoraRecipe(config, open_lora_base(config.finetune.base))
    return FullRecipe(config)
