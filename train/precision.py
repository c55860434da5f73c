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


MAX_LOSS_SCALE = 2.0**24  # the ceiling NVIDIA Apex's dynamic scaler uses; fp16 gradients gain nothing beyond it


@flax.struct.dataclass
class LossScale:
    """Dynamic loss scale (Micikevicius et al., 2018): halve on non-finite grads (down to 1), double after `period`
    good steps (up to MAX_LOSS_SCALE). Only fp16 needs it: disabled (fp32, bf16), its value is 1 and it never
    changes, so no state grows over a long run."""

    scale: jax.Array  # [] float32
    good_steps: jax.Array  # [] int32
    period: int = flax.struct.field(pytree_node=False, default=2000)
    enabled: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, enabled: bool, initial: float = 2.0**15) -> "LossScale":
        return cls(scale=jnp.float32(initial if enabled else 1.0), good_steps=jnp.int32(0), enabled=enabled)

    @property
    def value(self) -> jax.Array:
        """The factor the loss is multiplied by: `scale` when enabled, else 1 (whatever an older checkpoint holds)."""
        return self.scale if self.enabled else jnp.float32(1.0)

    def unscale(self, grads):
        return jax.tree_util.tree_map(lambda g: g / self.value.astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> "LossScale":
        """The scale for the next step; disabled, it is reset to 1 with no good steps counted."""
        if not self.enabled:
            return self.replace(scale=jnp.ones_like(self.scale), good_steps=jnp.zeros_like(self.good_steps))
        grown = self.good_steps + 1 >= self.period
        doubled = jnp.minimum(self.scale * 2, MAX_LOSS_SCALE)
        scale = jnp.where(grads_finite, jnp.where(grown, doubled, self.scale), jnp.maximum(self.scale / 2, 1.0))
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    """[] bool: every value of every floating-point array in `tree` is finite (integer arrays always are)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
