"""Serving variables: float (or QAT-trained) params -> int8/int4 weights + scales in AQT's `aqt` collection, and
the tools that read them back (restore template, stored weights, dequantize, bytes).

The serving tree keeps no float copy of a quantized kernel, so its size is close to bits/32 of the float one;
`check_serving_variables` proves it against what the serving model actually reads.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from aqt.jax.v2.utils import QuantMode

from quant import ggml
from quant.config import QuantConfig
from quant.plan import ATTENTION, EMBED, Path, Plan, kernel_name, make_plan, path_str
from quant.provider import dequantize_weight, make_matmul, resolve_numerics
from quant.serving_int import requantize_per_channel
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.model import Transformer

Variables = dict[str, Any]


def weight_layers(plan: Plan) -> list[Path]:
    """The layers whose kernel is stored as integers when serving."""
    return [path for path, p in plan.items() if p is not None and p.kind != ATTENTION]


def strip_quantized_kernels(params: dict, plan: Plan) -> dict:
    """params without the float kernels of quantized layers (a layer left empty is dropped)."""
    drop = {path + (kernel_name(path),) for path in weight_layers(plan)}

    def keep(tree: dict, prefix: tuple[str, ...]) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                value = keep(value, prefix + (key,))
                if value:
                    out[key] = value
            elif prefix + (key,) not in drop:
                out[key] = value
        return out

    return keep(params, ())


def convert(model_cfg: ModelConfig, quant_cfg: QuantConfig, params: dict, sample_tokens=None) -> Variables:
    """Quantize `params` (the float "params" collection) with AQT's CONVERT mode into serving variables.

    Returns {"params": params minus quantized kernels, "aqt": int weights and scales}. `sample_tokens` ([batch, seq]
    int) only drives the forward pass that writes the weights; activations are quantized on the fly when serving,
    so any tokens give the same result.
    """
    provider = make_matmul(model_cfg, quant_cfg, QuantMode.CONVERT)
    plan, params = provider.plan, flax.core.unfreeze(nn.unbox(params))
    model = Transformer(model_cfg, matmul=provider)
    tokens = np.zeros((1, min(8, model_cfg.seq_len)), np.int32) if sample_tokens is None else sample_tokens
    _, written = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["aqt"]))(params, tokens)
    variables = {"params": strip_quantized_kernels(params, plan)}
    if written.get("aqt"):  # a plan with every layer float writes none (and restores none)
        variables["aqt"] = replace_quantized_weights(written["aqt"], ggml_blocks(params, plan))
    check_serving_variables(model_cfg, quant_cfg, variables)
    return variables


def serving_template(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> Variables:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of the variables the serving model reads: a restore target."""
    model = Transformer(model_cfg, matmul=make_matmul(model_cfg, quant_cfg, QuantMode.SERVE))
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))))


def float_copies(variables: Variables, plan: Plan) -> list[str]:
    """Quantized layers whose float kernel is still in variables["params"] (should be none)."""
    def has_kernel(path: Path) -> bool:
        node = variables.get("params", {})
        for key in path + (kernel_name(path),):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    return [path_str(path) for path in weight_layers(plan) if has_kernel(path)]


def check_serving_variables(model_cfg: ModelConfig, quant_cfg: QuantConfig, variables: Variables) -> None:
    """UserError unless `variables` hold exactly what the serving model reads: no float copy of a quantized kernel,
    every integer weight and scale present with the planned shape and dtype."""
    copies = float_copies(variables, make_plan(model_cfg, quant_cfg))
    if copies:
        raise UserError(f"serving variables still hold float kernels of quantized layers: {', '.join(copies)}")
    expected = jax.tree_util.tree_flatten_with_path(serving_template(model_cfg, quant_cfg))[0]
    got = jax.tree_util.tree_flatten_with_path(variables)[0]
    describe = lambda leaves: {jax.tree_util.keystr(k): (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in leaves}
    expected, got = describe(expected), describe(got)
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise UserError(f"serving variables do not match the quantization config at {key}: expected "
                            f"{expected.get(key, 'nothing')}, found {got.get(key, 'nothing')}")


def serving_bytes(variables: Variables) -> dict[str, float]:
    """Bytes of `variables` by dtype name, plus "total"; int4 counts half a byte (as packed on disk/device)."""
    sizes: dict[str, float] = {}
    for leaf in jax.tree_util.tree_leaves(variables):
        dtype = jnp.dtype(leaf.dtype)
        per_item = jnp.iinfo(dtype).bits / 8 if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize
        sizes[dtype.name] = sizes.get(dtype.name, 0) + per_item * int(np.prod(leaf.shape))
    sizes["total"] = sum(sizes.values())
    return sizes


def quantized_weights(aqt_vars: dict) -> dict[Path, dict[str, jax.Array]]:
    """{layer path: {"value": int weights, "scale": float scales}} from an `aqt` collection."""
    found = {}

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            if key == "qrhs":
                found[prefix[:-2]] = dict(value)  # drop the ("dot_general", "aqt") module names
            elif isinstance(value, dict):
                walk(value, prefix + (key,))

    walk(aqt_vars, ())
    return found


def replace_quantized_weights(aqt_vars: dict, weights: dict[Path, dict[str, Any]]) -> dict:
    """A copy of an `aqt` collection with the stored (value, scale) of the layers in `weights` replaced.

    `weights` maps a layer path to {"value": integers, "scale": scales}, each with exactly the shape and dtype of the
    array it replaces (the layout `quantized_weights` returns): this is how quantizers other than AQT's own
    round-to-nearest (GPTQ, ggml block formats) write serving runs that every reader already understands.
    Raises UserError for an unknown layer or a shape/dtype that differs from the stored one.
    """
    stored = quantized_weights(aqt_vars)
    for path, new in weights.items():
        if path not in stored:
            raise UserError(f"no quantized weight stored for layer {path_str(path)}")
        for key in ("value", "scale"):
            old = stored[path][key]
            if tuple(np.shape(new[key])) != tuple(old.shape) or jnp.dtype(new[key].dtype) != jnp.dtype(old.dtype):
                raise UserError(f"{path_str(path)} {key}: expected {tuple(old.shape)} {jnp.dtype(old.dtype)}, got "
                                f"{tuple(np.shape(new[key]))} {jnp.dtype(new[key].dtype)}")

    return swap_weights(aqt_vars, weights)


def swap_weights(aqt_vars: dict, weights: dict[Path, dict[str, Any]]) -> dict:
    """A copy of an `aqt` collection with the (value, scale) of the layers in `weights` replaced, unchecked."""
    def walk(node: dict, prefix: tuple[str, ...]) -> dict:
        out = {}
        for key, value in node.items():
            if key == "qrhs" and prefix[:-2] in weights:
                out[key] = {**value, **{k: jnp.asarray(weights[prefix[:-2]][k]) for k in ("value", "scale")}}
            elif isinstance(value, dict):
                out[key] = walk(value, prefix + (key,))
            else:
                out[key] = value
        return out

    return walk(flax.core.unfreeze(aqt_vars), ())


def ggml_blocks(params: dict, plan: Plan) -> dict[Path, dict[str, jax.Array]]:
    """{layer: {"value", "scale"}} for the layers of `plan` in a ggml scheme: their float kernels [in, out] quantized
    by `quant.ggml` (gguf's codes and scales exactly), in AQT's serving layout: value [in // 32, 32, out] int8 (Q8_0)
    or int4 (Q4_0), scale [in // 32, 1, 1, out] float16."""
    blocks = {}
    for path, layer in plan.items():
        if layer is not None and layer.scheme != "aqt":
            kernel = params
            for key in path + (kernel_name(path),):
                kernel = kernel[key]
            codes, scales = ggml.quantize(kernel, layer.scheme)
            value_dtype = jnp.int4 if layer.weight_bits == 4 else jnp.int8
            blocks[path] = {"value": codes.astype(value_dtype), "scale": scales[:, None, None, :]}
    return blocks


def int8_containers(variables: Variables) -> Variables:
    """`variables` with every int4 array of the `aqt` collection held as int8 (the same codes, one per byte).

    For serving on XLA CPU, where converting int4 to float costs about 4x converting int8: the served matmul
    dequantizes int8 codes instead, at twice the int4 parameter bytes in memory. Checkpoints keep int4 on disk.
    """
    widen = lambda x: x.astype(jnp.int8) if jnp.dtype(x.dtype) == jnp.int4 else x
    return {**variables, "aqt": jax.tree_util.tree_map(widen, variables["aqt"])} if "aqt" in variables else variables


def per_channel_int8_layers(plan: Plan) -> set[Path]:
    """The layers `per_channel_int8` re-quantizes: AQT weight-only per-group weight layers (not the embedding)."""
    return {path for path, p in plan.items() if p is not None and p.kind not in (ATTENTION, EMBED)
            and p.act_bits is None and p.group_size is not None and p.scheme == "aqt"}


def per_channel_int8(variables: Variables, plan: Plan) -> Variables:
    """`variables` with every weight-only per-group layer of `plan` (not the embedding table) re-quantized to int8
    per channel (`quant.serving_int.requantize_per_channel`: value [in, out] int8, scale [1, 1, out] float32; each
    weight within a 1/254 part of its column's abs-max). On CPU such a layer with `int` numerics serves as one int8
    dot over hi/lo activations (quant.serving_int), the fastest matmul there; same bytes as `int8_containers`.
    A serving layout, not a checkpoint's: `check_serving_variables` expects the per-group shapes."""
    targets = per_channel_int8_layers(plan)
    if "aqt" not in variables or not targets:
        return variables
    stored = quantized_weights(variables["aqt"])
    weights = {}
    for path in targets & set(stored):
        value, scale = requantize_per_channel(stored[path]["value"].astype(jnp.int8), stored[path]["scale"])
        weights[path] = {"value": jnp.asarray(value), "scale": jnp.asarray(scale)}
    return {**variables, "aqt": swap_weights(variables["aqt"], weights)}


def served_layout(variables: Variables, model_cfg: ModelConfig, quant_cfg: QuantConfig) -> Variables:
    """The in-memory layout a serving run is served from on this backend: on CPU, int4 codes in int8 containers
    (`int8_containers`: about 2-3x faster dequantizing, at one byte per code instead of half), and with `int`
    numerics and `quant.serve_per_channel_int8` every weight-only per-group layer re-quantized to int8 per channel
    (`per_channel_int8`: served by one int8 dot, within a 1/254 part of each column's abs-max of the stored weight;
    without it those layers keep their exact codes, quant.serving_group); elsewhere unchanged."""
    if jax.default_backend() != "cpu" or "aqt" not in variables:
        return variables
    variables = int8_containers(variables)
    if resolve_numerics(quant_cfg.numerics) == "int" and quant_cfg.serve_per_channel_int8:
        variables = per_channel_int8(variables, make_plan(model_cfg, quant_cfg))
    return variables


def dequantize(value, scale) -> np.ndarray:
    """The float32 kernel [in, out] a stored (value, scale) pair stands for, as a host array (see
    `quant.provider.dequantize_weight` for the shapes)."""
    return np.asarray(dequantize_weight(value, scale, jnp.float32))
