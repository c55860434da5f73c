"""Hooks: observe or change a layer's quantized matmul without editing the model or AQT.

A `LayerHook` wraps the dot_general of every weight layer whose path ("layer_0/mlp/up") its regex matches:
`fn(ctx, x, kernel, next) -> y` may look at or change `x` and `kernel`, call `next(x, kernel)` (the quantized
matmul, or the next hook) and change its result. `ctx.module` is the layer's Flax module, so a hook can
`ctx.module.sow(...)` statistics into a collection or `ctx.module.make_rng(...)`. Pass hooks to `make_matmul`.
Attention einsums get no hooks: the model runs them inside `jnp.einsum`'s own jit, where Flax state is out of reach.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Next = Callable[[jax.Array, jax.Array], jax.Array]  # (x: [batch, seq, in], kernel: [in, out]) -> [batch, seq, out]


@dataclasses.dataclass(frozen=True)
class HookContext:
    path: tuple[str, ...]  # the layer's module path, e.g. ("layer_0", "mlp", "up")
    plan: Any  # its LayerPlan, or None when the layer computes in float
    module: nn.Module  # the layer's dot_general module (bound): sow into collections, make rngs


HookFn = Callable[[HookContext, jax.Array, jax.Array, Next], jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerHook:
    match: str  # regex searched in the layer path joined with "/"
    fn: HookFn

    def __post_init__(self):
        re.compile(self.match)

    def applies_to(self, path: tuple[str, ...]) -> bool:
        return re.search(self.match, "/".join(path)) is not None


def chain(hooks: tuple[LayerHook, ...], ctx: HookContext, dot: Next) -> Next:
    """`dot` wrapped by the hooks that apply to ctx.path; the first hook is the outermost."""
    for hook in reversed([h for h in hooks if h.applies_to(ctx.path)]):
        dot = (lambda fn, inner: lambda x, w: fn(ctx, x, w, inner))(hook.fn, dot)
    return dot


def record_abs_max(match: str = ".", collection: str = "quant_stats") -> LayerHook:
    """Sow each matching layer's input abs-max as `act_abs_max` into `collection`, keeping the running max.

    Apply with `mutable=[collection]`; feed the returned collection back in to accumulate over batches.
    """
    def fn(ctx: HookContext, x, kernel, next_dot):
        ctx.module.sow(collection, "act_abs_max", jnp.max(jnp.abs(x)).astype(jnp.float32),
                       init_fn=lambda: jnp.zeros((), jnp.float32), reduce_fn=jnp.maximum)
        return next_dot(x, kernel)

    return LayerHook(match, fn)


def capture_inputs(match: str = ".", collection: str = "quant_inputs") -> LayerHook:
    """Sow each matching layer's input x (its last value) as `x` into `collection` (used by the error report)."""
    def fn(ctx: HookContext, x, kernel, next_dot):
        ctx.module.sow(collection, "x", x, init_fn=lambda: jnp.zeros((), x.dtype), reduce_fn=lambda _, new: new)
        return next_dot(x, kernel)

    return LayerHook(match, fn)
