"""The math of folding LoRA adapters into their integer base: dequantize each weight, add A @ B * alpha / rank, and
re-quantize with the base's own plan (AQT layers on the base's own grid) into serving variables; measure what the
re-quantization costs per layer and in the logits. `python -m quant.merge` (quant/merge.py) runs it on a LoRA run and
writes the serving run.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from quant.config import QuantConfig
from quant.grid import abs_max_scale, round_to_grid
from quant.lora import adapter_deltas, split_adapters
from quant.plan import LayerPlan, kernel_name, make_plan, path_str
from quant.plan import Path as LayerPath
from quant.ptq_methods import aqt_layout
from quant.serving import Variables, convert, dequantize, quantized_weights, replace_quantized_weights
from slm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MergeRow:
    layer: str
    delta_rel: float  # |A @ B * alpha / r| / |W|: how much the adapter changes the layer's weight
    weight_rel_err: float  # |Q(W + d) - (W + d)| / |W + d|: re-quantization error of the merged weight
    delta_lost: float  # |(Q(W + d) - W) - d| / |d|: share of the adapter's change the integers fail to carry


def _norm(x) -> float:
    return float(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))))


def _ratio(num: float, den: float) -> float:
    return num / den if den else (0.0 if num == 0 else math.inf)


def _node(tree: dict, path: LayerPath) -> dict:
    """The dict at `path` in a nested dict, created where missing."""
    for key in path:
        tree = tree.setdefault(key, {})
    return tree


def merged_float_params(variables: Variables, alpha: float) -> tuple[dict, dict, dict]:
    """Base + adapters variables -> (float params with every kernel = dequantized base + adapter delta, the deltas,
    the dequantized base kernels), both dicts keyed by layer path."""
    adapters, params = split_adapters(variables["params"])  # `params` is built afresh: safe to fill in
    deltas = adapter_deltas(adapters, alpha)
    base = {path: dequantize(w["value"], w["scale"]) for path, w in quantized_weights(variables.get("aqt", {})).items()}
    for path, kernel in base.items():
        _node(params, path)[kernel_name(path)] = kernel
    for path, delta in deltas.items():
        node = _node(params, path)
        base.setdefault(path, node["kernel"])  # a layer the plan keeps float: its kernel is a (frozen) param
        node["kernel"] = node["kernel"] + delta
    return params, deltas, base


def merge_adapters(model_cfg: ModelConfig, quant_cfg: QuantConfig, variables: Variables, alpha: float,
                   sample_tokens=None) -> tuple[Variables, list[MergeRow]]:
    """Serving variables of the merged model (re-quantized with quant_cfg's plan, as `quant.serving.convert`
    does; AQT layers on their base's grid, `base_grid_codes`, so a layer without an adapter keeps its integers and
    scales bit for bit), and one row per adapted layer on what re-quantization did to it."""
    params, deltas, base = merged_float_params(variables, alpha)
    merged = convert(model_cfg, quant_cfg, params, sample_tokens)
    plan, base_stored = make_plan(model_cfg, quant_cfg), quantized_weights(variables.get("aqt", {}))
    on_base_grid = {path: base_grid_codes(_node(params, path)[kernel_name(path)], base_stored[path], plan[path],
                                          stored)
                    for path, stored in quantized_weights(merged["aqt"]).items()
                    if path in base_stored and plan.get(path) is not None and plan[path].scheme == "aqt"}
    merged = {**merged, "aqt": replace_quantized_weights(merged["aqt"], on_base_grid)}
    stored = quantized_weights(merged["aqt"])
    rows = []
    for path, delta in deltas.items():
        target = base[path] + delta
        got = dequantize(stored[path]["value"], stored[path]["scale"]) if path in stored else target
        rows.append(MergeRow(path_str(path), _ratio(_norm(delta), _norm(base[path])),
                             _ratio(_norm(got - target), _norm(target)),
                             _ratio(_norm(got - base[path] - delta), _norm(delta))))
    return merged, rows


def base_grid_codes(kernel, base: dict, layer_plan: LayerPlan, layout: dict) -> dict:
    """An AQT layer's merged float kernel [in, out] re-quantized on its base's grid, in the stored layout of `layout`
    ({"value", "scale"}): each group's scale is the base's (`base`: its stored {"value", "scale"}), or AQT's abs-max
    scale where the merged weights outgrow the base's range. AQT's own round-to-nearest of the dequantized base
    would put max|w| = 7 steps on the edge of an 8th (its abs-max sits 7.5 steps out) and shrink every weight of
    the layer by 7/7.5 at 4 bits (127/127.5 at 8); on the base's grid an unchanged weight keeps its code exactly."""
    value = np.asarray(base["value"])
    fan_in, out = int(np.prod(value.shape[:-1])), value.shape[-1]
    base_scales = np.asarray(base["scale"], np.float32).reshape(-1, out)
    groups = base_scales.shape[0]
    grouped = np.asarray(kernel, np.float32).reshape(groups, fan_in // groups, out)
    bits, scale_dtype = layer_plan.weight_bits, layer_plan.scale_dtype
    scales = np.maximum(base_scales, abs_max_scale(grouped, bits, scale_dtype, axis=1)[:, 0])
    codes = round_to_grid(grouped, scales[:, None], bits, scale_dtype).reshape(fan_in, out)
    return aqt_layout(codes, scales, layout)


def logits_error(reference: jax.Array, approx: jax.Array) -> dict[str, float]:
    """How far `approx` logits are from `reference` ([batch, seq, vocab]): relative L2 error, largest absolute
    difference, and the share of positions whose most likely next token agrees."""
    reference, approx = jnp.asarray(reference, jnp.float32), jnp.asarray(approx, jnp.float32)
    return {"rel_err": _ratio(_norm(approx - reference), _norm(reference)),
            "max_abs": float(jnp.max(jnp.abs(approx - reference))),
            "top1_agree": float(jnp.mean(jnp.argmax(approx, -1) == jnp.argmax(reference, -1)))}


def format_rows(rows: list[MergeRow]) -> str:
    header = ("layer", "|d|/|W|", "merged w rel err", "adapter change lost")
    table = [header] + [(r.layer, f"{r.delta_rel:.4f}", f"{r.weight_rel_err:.4f}", f"{100 * r.delta_lost:.1f}%")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
