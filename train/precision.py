"""Mixed precision: which dtype the model computes in, and dynamic loss scaling for fp16.

Master params and optimizer state always stay float32; only activations and matmuls drop to bf16/fp16.
No maintained JAX library covers loss scaling today (DeepMind's `jmp` is archived), so the few lines live here.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str):
    return COMPUTE_DTYPES[precision]


@flax.struct.dataclass
class LossScale:
    """Dynamic loss scale (Micikevicius et al., 2018): halve on non-finite grads, double after `period` good steps."""

    scale: jax.Array  # [] float32
    good_steps: jax.Array  # [] int32
    period: int = flax.struct.field(pytree_node=False, default=2000)

    @classmethod
    def create(cls, enabled: bool, initial: float = 2.0**15) -> "LossScale":
        return cls(scale=jnp.float32(initial if enabled else 1.0), good_steps=jnp.int32(0))

    def unscale(self, grads):
        return jax.tree_util.tree_map(lambda g: g / self.scale.astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> "LossScale":
        grown = self.good_steps + 1 >= self.period
        scale = jnp.where(grads_finite, jnp.where(grown, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, 1.0))
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
