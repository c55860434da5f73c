"""LoRA adapters over frozen (e.g. INT8/INT4 serving) weights: a `MatmulProvider` that wraps another one.

For each target layer, y = base_dot(x, W) + dropout(x) @ A @ B * alpha / rank, with A: [in, rank] and B: [rank, out]
as float params of a `lora` module inside the layer (B starts at zero, so a fresh adapter changes nothing). The base
dot_general keeps its own module path, so a serving model's `aqt` collection loads unchanged under the adapters.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from quant.serving import quantized_weights
from quant.plan import WEIGHT, Path, model_layers, path_str
from quant.provider import dequantize_weight
from slm_jax.config import ModelConfig
from slm_jax.layers import MatmulProvider, embedding_lookup, embeds_by_matmul

ADAPTER = "lora"  # module name of an adapter inside its layer; its params are "lora_a" and "lora_b"


class LoraAdapter(nn.Module):
    """x: [..., in] -> dropout(x) @ A @ B * alpha / rank: [..., features], computed in x's dtype."""

    features: int
    rank: int
    alpha: float
    dropout: float = 0.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Kaiming-uniform A (bound 1/sqrt(in), as in the LoRA paper's code) and zero B: the adapter starts as a no-op.
        a = self.param("lora_a", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                       (x.shape[-1], self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        if self.dropout > 0 and self.has_rng("dropout"):  # train steps pass a dropout rng; eval and sampling do not
            x = nn.Dropout(self.dropout, deterministic=False)(x)
        h = jnp.dot(x, a.astype(x.dtype))  # [..., rank]
        return jnp.dot(h, b.astype(x.dtype)) * jnp.asarray(self.alpha / self.rank, x.dtype)


class LoraProvider:
    """MatmulProvider: `base`'s dot_general everywhere, plus a LoraAdapter on the layers in `targets`.

    Whether a layer keeps a float kernel is the base's call: over a serving provider, target layers hold only
    integer weights (in `aqt`) and the adapter's float A and B. Gradients reach the activations through a layer with
    integer weights by the straight-through rule dx = dy @ dequantize(W)^T (see `straight_through`), never through
    AQT's own backward pass, and no gradient is ever formed for the integer weights.
    """

    def __init__(self, base: MatmulProvider, targets: frozenset[Path], rank: int, alpha: float, dropout: float = 0.0):
        self.base, self.targets = base, frozenset(targets)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout

    def keeps_float_kernel(self, path: Path) -> bool:
        return self.base.keeps_float_kernel(path)

    def embeds_by_matmul(self, path: Path) -> bool:
        return embeds_by_matmul(self.base, path)

    def embedding_lookup(self, path: Path):
        return embedding_lookup(self.base, path)

    def dot_general(self, path: Path):
        base_dot = self.base.dot_general(path)  # keeps its own name ("dot_general") inside the layer
        # Attention einsums get a pure function from the base, never a module: only weight layers are asked about.
        integer = isinstance(base_dot, nn.Module) and not self.base.keeps_float_kernel(path)
        if not integer and path not in self.targets:
            return base_dot

        def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
            (lhs_contract, rhs_contract), batch = dimension_numbers
            if tuple(batch) != ((), ()) or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,):
                raise ValueError(f"LoRA expects x @ W over x's last axis in {path_str(path)}, got {dimension_numbers}")
            if integer:
                y = base_dot(jax.lax.stop_gradient(lhs), rhs, dimension_numbers, precision, preferred_element_type)
                y = straight_through(lhs, y, stored_kernel(base_dot))
            else:
                y = base_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type)
            if path not in self.targets:
                return y
            # Built while the layer's compact __call__ runs, so the adapter becomes the layer's child "lora".
            adapter = LoraAdapter(rhs.shape[-1], self.rank, self.alpha, self.dropout, name=ADAPTER)
            return y + adapter(lhs).astype(y.dtype)

        return dot_general


def stored_kernel(module: nn.Module) -> jax.Array:
    """The float kernel [in, out] that a (bound, already called) serving dot_general's integer weights stand for,
    computed in float32 in the traced program."""
    (stored,) = quantized_weights(module.variables["aqt"]).values()
    return dequantize_weight(stored["value"], stored["scale"], jnp.float32)


@jax.custom_vjp
def straight_through(x: jax.Array, y: jax.Array, kernel: jax.Array) -> jax.Array:
    """y, a frozen layer's output for x computed under stop_gradient, given x's gradient through x @ kernel.

    With kernel = the layer's dequantized weights, dx = dy @ kernel^T is the exact input gradient of a weight-only
    quantized layer and the straight-through estimate when activations are quantized too. It stands in for AQT's
    backward pass through a serving module, which in aqtp 0.9 calls `jax.core.get_aval` (removed in JAX 0.10).
    y and kernel are frozen: they get no gradient.
    """
    return y


def _straight_through_fwd(x, y, kernel):
    return y, (kernel, jnp.zeros((0,), x.dtype))  # the empty array carries x's dtype to the backward pass


def _straight_through_bwd(residuals, dy):
    kernel, x_like = residuals
    dx = jnp.einsum("...o,io->...i", dy, kernel.astype(dy.dtype)).astype(x_like.dtype)
    return dx, None, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def target_layers(model_cfg: ModelConfig, pattern: str) -> frozenset[Path]:
    """The weight layers (never attention einsums) whose path, e.g. "layer_0/attn/q", the regex `pattern` matches."""
    regex = re.compile(pattern)
    return frozenset(layer.path for layer in model_layers(model_cfg)
                     if layer.kind == WEIGHT and regex.search(path_str(layer.path)))


def split_adapters(params: dict) -> tuple[dict, dict]:
    """A "params" tree -> (the adapters' subtrees, everything else); empty branches are dropped from both."""
    def split(node: dict) -> tuple[dict, dict]:
        adapters, rest = {}, {}
        for key, value in node.items():
            if key == ADAPTER:
                adapters[key] = value
            elif isinstance(value, dict):
                a, r = split(value)
                if a:
                    adapters[key] = a
                if r:
                    rest[key] = r
            else:
                rest[key] = value
        return adapters, rest

    return split(dict(params))


def adapters_by_layer(params: dict) -> dict[Path, dict]:
    """{layer path: its adapter's {"lora_a": [in, rank], "lora_b": [rank, out]}} for every adapter in a "params"
    tree (arrays or shape structs), in the tree's order."""
    found = {}

    def walk(node: dict, prefix: Path) -> None:
        for key, value in node.items():
            if key == ADAPTER:
                found[prefix] = value
            elif isinstance(value, dict):
                walk(value, prefix + (key,))

    walk(params, ())
    return found


def adapter_deltas(adapters: dict, alpha: float) -> dict[Path, jax.Array]:
    """{layer path: A @ B * alpha / rank, the [in, out] float change the adapter makes to that layer's kernel}."""
    deltas = {}
    for path, adapter in adapters_by_layer(adapters).items():
        a, b = jnp.asarray(adapter["lora_a"], jnp.float32), jnp.asarray(adapter["lora_b"], jnp.float32)
        deltas[path] = a @ b * (alpha / a.shape[1])
    return deltas
