"""The matmul floor of a training step: every matmul of one step's forward and backward pass at its own shape, run
alone in one jitted program. Its time is what the step would take if everything but its matmuls were free, so the
model FLOPs over that time, against the float32 peak, is the highest MFU XLA's matmuls allow at that model size
(small matrices reach a smaller part of the peak than section 1's [2048, 2048] product). Section 2 reports it beside
the measured steps, to show how much of a step is matmuls and how much everything else;
`python -m train.bench.matmul_floor` prints one config's.
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.config import ModelConfig
from train.bench.common import timed
from train.bench.trust import spread

Shape = tuple[int, ...]


def step_matmuls(model: ModelConfig, batch: int) -> list[tuple[Shape, Shape]]:
    """(lhs shape, rhs shape) of every matmul in one training step of `model` on `batch` sequences of seq_len.

    Each weight [k, n] (q, k, v, o, gate, up, down per layer, and the LM head) gives three over the step's
    T = batch * seq_len tokens: forward x [T, k] @ W, input gradient dy [T, n] @ W^T, weight gradient x^T [k, T] @ dy.
    Attention gives six batched products over batch * n_heads heads of head_dim per layer: QK^T and P V forward,
    and dO V^T, P^T dO, dS K, dS^T Q backward. The FLOPs (2 x lhs elements x rhs's last axis, summed) are the
    bench's model FLOPs per step (train.bench.speed.flops_per_token x T) for a model whose heads span d_model."""
    t, s, hd, h = batch * model.seq_len, model.seq_len, model.head_dim, model.n_heads
    d, kv, f = model.d_model, model.kv_heads * hd, model.hidden
    weights = [(d, h * hd), (d, kv), (d, kv), (h * hd, d), (d, f), (d, f), (f, d)] * model.n_layers
    weights.append((d, model.vocab_size))
    shapes = [pair for k, n in weights for pair in (((t, k), (k, n)), ((t, n), (n, k)), ((k, t), (t, n)))]
    bh = batch * h
    scores, values = ((bh, s, hd), (bh, hd, s)), ((bh, s, s), (bh, s, hd))
    return shapes + [scores, values, scores, values, values, values] * model.n_layers


def matmul_flops(shapes: list[tuple[Shape, Shape]]) -> int:
    """FLOPs of the products `shapes` lists: 2 x (elements of lhs) x (last axis of rhs) each."""
    return sum(2 * int(np.prod(lhs)) * rhs[-1] for lhs, rhs in shapes)


def measure_floor(model: ModelConfig, batch: int, reps: int) -> dict:
    """Seconds of `step_matmuls(model, batch)` in float32, all in one jit on the default device (one untimed call,
    then `reps` timed): {"matmuls", "flops", "median_s", "min_s", "max_s", "gflops", "spread"}."""
    shapes = step_matmuls(model, batch)
    rng = np.random.default_rng(0)
    operands = [(jnp.asarray(rng.standard_normal(lhs), jnp.float32), jnp.asarray(rng.standard_normal(rhs),
                                                                                   jnp.float32))
                for lhs, rhs in shapes]
    products = jax.jit(lambda pairs: [jnp.matmul(a, b) for a, b in pairs])
    timed(lambda: products(operands))
    seconds = [timed(lambda: products(operands)) for _ in range(reps)]
    flops = matmul_flops(shapes)
    return {"matmuls": len(shapes), "flops": flops, "median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "gflops": flops / statistics.median(seconds) / 1e9, "spread": spread(seconds)}


def square_matmul_seconds(n: int, dtype, reps: int) -> tuple[float, list[float]]:
    """Seconds of a jitted [n, n] @ [n, n] product of two random arrays of `dtype` (2 * n^3 FLOPs): (the first call,
    compilation included; each of `reps` timed calls after it). Section 1's peak and this module's command use it."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), dtype) for i in (0, 1))
    product = jax.jit(jnp.matmul)
    first = timed(lambda: product(a, b))
    return first, [timed(lambda: product(a, b)) for _ in range(reps)]


def peak_gflops(n: int, reps: int) -> float:
    """GFLOP/s of a float32 [n, n] @ [n, n] product (median of `reps` after one untimed call), as section 1 of the
    bench measures its peak."""
    return 2 * n ** 3 / statistics.median(square_matmul_seconds(n, jnp.float32, reps)[1]) / 1e9
