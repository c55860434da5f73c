"""`TrainState` and the pure, jitted steps: `train_step(state, batch) -> (state, metrics)` and `eval_step`."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from quant.config import QuantConfig
from train.precision import LossScale, all_finite

Batch = tuple[jax.Array, jax.Array]  # (inputs, targets), each int32 [grad_accum, batch, seq]

# XLA CPU (jax 0.10) hands reductions as well as dots to YNNPACK by default. For a training step's small
# reductions (softmax and RMSNorm backward) those kernels measured slower than XLA's own loops: at nanoGPT's size,
# dots only made a float step 5% faster in fp32 and bf16 and a weight-only INT4 QAT step 12% faster in bf16
# (interleaved in one process). With activations quantized (per-token abs-max reductions of every matmul input),
# YNNPACK's reductions win instead: an INT8 w8a8 QAT step in bf16 was 3-5% slower with dots only.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def steps_compiler_options(quant: QuantConfig | None = None) -> dict | None:
    """`compiler_options` for `jax.jit` of the train and eval steps of a model quantized by `quant` (None: float):
    CPU_COMPILER_OPTIONS on the CPU backend unless `quant` quantizes activations; None (XLA's defaults) otherwise
    and on GPU and TPU."""
    if jax.default_backend() != "cpu" or (quant is not None and quant.quantizes_activations):
        return None
    return dict(CPU_COMPILER_OPTIONS)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # trained parameters, float32 master copy
    opt_state: Any
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so randomness is a pure function of (seed, step)
    loss_scale: LossScale
    frozen: Any  # variables that are read but never trained (e.g. AQT's `aqt` collection of a serving model)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int, fp16: bool,
               frozen: Any = None) -> TrainState:
    """A fresh state; pure, so it can run under `jax.jit` (and `jax.eval_shape` for restore targets)."""
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))
    params = nn.unbox(variables["params"])
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng,
                      loss_scale=LossScale.create(fp16), frozen=frozen if frozen is not None else {})


def merge_variables(params: Any, frozen: Any) -> dict:
    """The variables `model.apply` takes: the trained `params` laid over the frozen collections. A frozen
    "params" tree (e.g. the float embeddings of a LoRA run's base) is merged with `params` key by key."""
    def merge(fixed, trained):
        if not isinstance(fixed, dict) or not isinstance(trained, dict):
            return trained
        return {**fixed, **{key: merge(fixed.get(key), value) for key, value in trained.items()}}

    frozen = dict(frozen or {})
    return {**frozen, "params": merge(frozen.pop("params", {}), params)}


def split_variables(variables: dict) -> tuple[Any, dict]:
    """A model's variables -> (its "params", every other collection): the arguments eval and train steps take."""
    return variables["params"], {key: value for key, value in variables.items() if key != "params"}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy in float32. logits: [batch, seq, vocab], targets: [batch, seq]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: Callable | None = None,
                    skip_nonfinite: bool = False) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`skip_nonfinite` (fp16): a step whose grads overflowed is dropped and the loss scale shrinks instead."""
    def loss_fn(params, frozen, inputs, targets, rng, scale):
        logits, _ = model.apply(merge_variables(params, frozen), inputs, deterministic=False, rngs={"dropout": rng})
        loss = cross_entropy(logits, targets)
        return loss * scale, loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        inputs, targets = batch
        step_rng = jax.random.fold_in(state.rng, state.step)
        scale = state.loss_scale.value

        def micro_step(grads_sum, micro):
            x, y, i = micro
            (_, loss), grads = grad_fn(state.params, state.frozen, x, y, jax.random.fold_in(step_rng, i), scale)
            return jax.tree_util.tree_map(jnp.add, grads_sum, grads), loss

        accum = inputs.shape[0]
        if accum == 1:  # no accumulation: the scan's loop and zero-filled sums would only add work
            (_, loss), grads = grad_fn(state.params, state.frozen, inputs[0], targets[0],
                                       jax.random.fold_in(step_rng, 0), scale)
            losses = loss[None]
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads, losses = jax.lax.scan(micro_step, zeros, (inputs, targets, jnp.arange(accum)))
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        grads = state.loss_scale.unscale(grads)
        finite = all_finite(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            if not skip_nonfinite:
                return new
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            loss_scale=state.loss_scale.adjust(finite),
        )
        metrics = {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads), "grads_finite": finite,
                   "loss_scale": scale}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable:
    def eval_step(params, frozen, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        logits, _ = model.apply(merge_variables(params, frozen), inputs)
        return cross_entropy(logits, targets)

    return eval_step
