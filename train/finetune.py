"""Fine-tuning: the `finetune` config section, layer freezing for continued (QAT) training, and LoRA adapters
trained over a frozen serving (INT8/INT4) run, saved on their own with a fingerprint of the base they belong to.

`train.config` imports `FinetuneConfig` from here, so the helpers that need `train.build`/`train.workdir` import
them inside the functions that use them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from checkpoints.manager import key_path_str
from quant.lora import LoraProvider, split_adapters, target_layers
from slm_jax.errors import UserError
from train.steps import TrainState, merge_variables

METHODS = ("none", "qat", "lora")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    base: str | None = None  # lora: the serving (integer) workdir whose frozen weights the adapters train on
    method: str = "none"  # none (full fine-tuning from train.init_from) | qat (continued QAT) | lora
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapter's input only
    lora_targets: str = "attn/(q|v)|mlp/(gate|up|down)"  # regex searched in layer paths such as layer_0/attn/q
    freeze: str | None = None  # none/qat: regex searched in param paths (layer_0/attn/q/kernel); matches stay fixed

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"finetune.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise UserError(f"finetune.lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha <= 0:
            raise UserError(f"finetune.lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for key in ("lora_targets", "freeze"):
            try:
                re.compile(getattr(self, key) or "")
            except re.error as err:
                raise UserError(f"finetune.{key} is not a valid regex ({err})") from None
        if self.method == "lora":
            if not self.base:
                raise UserError("finetune.base must name the serving workdir LoRA trains over (finetune.method=lora)")
            if self.freeze is not None:
                raise UserError("finetune.freeze does not apply to finetune.method=lora (every base weight is frozen)")
        elif self.base is not None:
            raise UserError(f"finetune.base is only read by finetune.method=lora (method is {self.method}); "
                            f"full and QAT fine-tuning start from train.init_from")


def check_finetune(config) -> None:
    """Rules between `finetune` and the other sections of a root Config (called by check_consistency)."""
    method = config.finetune.method
    if method == "lora" and config.train.init_from:
        raise UserError("train.init_from does not apply to finetune.method=lora; the adapters start from "
                        "finetune.base")
    if method == "qat":
        if config.quant.mode != "qat":
            raise UserError(f"finetune.method=qat continues quantization-aware training: quant.mode must be qat, "
                            f"got {config.quant.mode}")
        if not config.train.init_from:
            raise UserError("finetune.method=qat needs train.init_from: the QAT (or float) workdir to continue")


def with_frozen(tx: optax.GradientTransformation, pattern: str | None) -> optax.GradientTransformation:
    """`tx` for params whose path does not match `pattern`; params that do get zero updates and no optimizer
    state (optax.multi_transform with set_to_zero)."""
    if pattern is None:
        return tx
    regex = re.compile(pattern)

    def labels(params):
        paths = {key_path_str(p): p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        frozen = [name for name in paths if regex.search(name)]
        if not frozen:
            raise UserError(f"finetune.freeze {pattern!r} matches no parameter (paths look like: "
                            f"{', '.join(list(paths)[:3])}, ...)")
        if len(frozen) == len(paths):
            raise UserError(f"finetune.freeze {pattern!r} matches every parameter; nothing would train")
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if regex.search(key_path_str(p)) else "trained", params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def lora_matmul(config, base_matmul) -> LoraProvider:
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


def fingerprint(variables: Any) -> str:
    """sha256 over every array of a model's variables: path, dtype, shape and bytes."""
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
    config: Any  # the base's own Config
    variables: dict  # {"params": float embeddings and norms, "aqt": integer weights and scales}

    @classmethod
    def open(cls, path: str | Path, key: str = "finetune.base") -> "LoraBase":
        from train.workdir import load_run
        try:
            run = load_run(Path(path))
        except UserError as err:
            raise UserError(f"{key}: cannot open the base model {path} ({err}); make it first, e.g. with the "
                            f"commands atop configs/finetune_int4_lora.yaml (python -m train.main --config "
                            f"finetune_base, then --config finetune_base_int4)") from None
        if run.metadata.get("kind") != "serving":
            raise UserError(f"{key}: {path} is a {run.metadata.get('kind')} run; LoRA trains over a serving "
                            f"(integer) run: convert it first (e.g. --config ptq_int4 --set train.init_from={path})")
        return cls(Path(path).resolve(), run.step, fingerprint(run.variables), run.config, run.variables)

    def run_config(self, config):
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

    def shardings(self, config, model, mesh):
        """NamedShardings of the LoRA TrainState, base included. The float model of the same config names every
        kernel's axes; integer weights and scales, and the adapters' A [in, r] and B [r, out], follow the kernel
        of their layer by shape (see `train.sharding.tree_shardings`)."""
        from slm_jax.model import Transformer
        from train.sharding import logical_axes, tree_shardings
        abstract = jax.eval_shape(lora_initializer(config, model))
        abstract = abstract.replace(frozen=jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                  self.variables))
        return tree_shardings(abstract, logical_axes(Transformer(config.model)), mesh)

    def initial_state(self, config, model, store, log, shardings) -> TrainState:
        """The adapters' state, fresh or resumed from `store` (None: always fresh), created in `shardings` (from
        `self.shardings`), with the base attached as `frozen`. The state then owns the base's arrays: a train
        step that donates its state frees them."""
        from train.sharding import abstract_with_shardings, create_sharded_state
        from train.workdir import check_resumable
        init, own = lora_initializer(config, model), shardings.replace(frozen={})
        latest = None if store is None else store.latest_step()
        if latest is None:
            state = create_sharded_state(init, own)
        else:
            metadata = store.metadata(latest)
            check_resumable(metadata, config, store.directory)
            self.check(metadata.get("base"), store.directory)
            log(f"resuming adapters from step {latest} in {store.directory}")
            state = store.restore(abstract_with_shardings(jax.eval_shape(init), own), latest)
        log(f"LoRA over {self.path} (step {self.step}): {count(state.params):,} adapter params on "
            f"{len(model.matmul.targets)} layers, {count(self.variables):,} frozen")
        return state.replace(frozen=jax.device_put(self.variables, shardings.frozen))

    def checkpoint(self, state: TrainState, metadata: dict) -> tuple[TrainState, dict]:
        """What a LoRA run saves: the adapters and their optimizer state only, and metadata naming the base."""
        return state.replace(frozen={}), {**metadata, "kind": "lora", "base": self.record()}


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def lora_initializer(config, model):
    """A zero-argument function building a fresh adapter-only TrainState (frozen left empty): jit it, or
    eval_shape it for a restore target. The RNG and init follow `train.build.state_initializer`."""
    from train.build import build_optimizer, state_initializer
    init, tx = state_initializer(config, model), build_optimizer(config)

    def initialize() -> TrainState:
        state = init()  # the unused float copies it initialises are dropped by XLA under jit
        adapters, _ = split_adapters(state.params)
        return state.replace(params=adapters, opt_state=tx.init(adapters), frozen={})

    return initialize


def load_lora_run(workdir: Path, step: int | None = None, base: Path | None = None):
    """A LoRA workdir as a `train.workdir.LoadedRun`: its base's variables with the adapters merged into "params".

    `base` overrides the base path recorded in the checkpoint (a moved base); either way its fingerprint must match.
    """
    from train.workdir import open_store
    store = open_store(workdir)
    try:
        return restore_lora_run(store, store.metadata(step), base)
    finally:
        store.close()


def restore_lora_run(store, metadata: dict, base: Path | None = None):
    """`load_lora_run` on an open store whose `metadata` (kind "lora") is already read: `train.workdir.load_run`
    hands LoRA checkpoints here."""
    from train.build import build_model
    from train.workdir import LoadedRun, config_from_metadata
    config = config_from_metadata(metadata, store.directory)
    recorded = metadata.get("base") or {}
    lora_base = LoraBase.open(base or recorded.get("path") or config.finetune.base,
                              key=f"base of {store.directory}")
    lora_base.check(recorded, store.directory)
    model = build_model(config)
    state = store.restore(jax.eval_shape(lora_initializer(config, model)), metadata["step"])
    return LoadedRun(config, model, merge_variables(state.params, lora_base.variables), metadata, metadata["step"])
