"""Per-layer quantization error report: what AQT (or a ggml block format) did to each weight and what that does to
the layer's output.

Each quantized weight layer is measured in isolation on the activations the float model feeds it for a given
batch (captured with a hook), so rows show where the error comes from rather than how it compounds; its KL column
(`quant.layer_kl`) shows what quantizing that layer alone costs the whole model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from aqt.jax.v2.utils import QuantMode

from quant import ggml
from quant.config import QuantConfig
from quant.folding import get_param
from quant.serving import dequantize, weight_layers
from quant.hooks import capture_inputs
from quant.layer_kl import single_layer_kl
from quant.plan import EMBED_PATH, LayerPlan, Path, kernel_name, make_plan, path_str
from quant.provider import QuantDotGeneral, make_matmul, resolve_numerics
from slm_jax.config import ModelConfig
from slm_jax.model import Transformer

INPUTS = "quant_inputs"


@dataclasses.dataclass(frozen=True)
class LayerReport:
    layer: str
    weight_bits: int
    act_bits: int | None
    granularity: str
    scale_min: float
    scale_max: float
    # Share of weights beyond the largest integer level, which the clip changes. AQT's abs-max maps each channel's
    # (group's) max to the edge of the last bucket (127.5 steps for int8, 7.5 for int4), so the values in that top
    # half step, the max among them, are clipped, losing at most half a step (like rounding). Expect about
    # 1/in_features (1/group_size) at int8, a few percent at int4; more would mean a clipping calibration.
    clipped: float
    weight_sqnr_db: float
    weight_rel_err: float
    output_sqnr_db: float  # this layer's output on the float model's activations, quantized vs float
    output_rel_err: float
    kl_mean: float | None = None  # KL(float || only this layer's weight quantized), nats, mean over tokens


def _errors(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    """(SQNR in dB, relative L2 error) of approx against ref."""
    signal = float(np.sum(np.square(ref, dtype=np.float64)))
    noise = float(np.sum(np.square(ref - approx, dtype=np.float64)))
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return sqnr, math.sqrt(noise / signal) if signal else 0.0


@functools.partial(jax.jit, static_argnames=("plan", "numerics"))
def _quantize_layer(x, kernel, plan: LayerPlan, numerics: str):
    """One layer's AQT dot_general in CONVERT mode: (quantized output, its frozen {"value", "scale"})."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    dot = QuantDotGeneral(("report",), plan, QuantMode.CONVERT, numerics)
    y, written = dot.apply({}, x, kernel, dims, mutable=["aqt"])
    return y, written["aqt"]["aqt"]["qrhs"]


@functools.partial(jax.jit, static_argnames=("plan", "numerics"))
def _serve_layer(x, stored, plan: LayerPlan, numerics: str):
    """One layer's AQT dot_general in SERVE mode on its stored {"value", "scale", ...}: the served output."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    dot = QuantDotGeneral(("report",), plan, QuantMode.SERVE, numerics)
    kernel = jnp.zeros((x.shape[-1], stored["value"].shape[-1]), x.dtype)  # SERVE reads only the stored weight
    return dot.apply({"aqt": {"aqt": {"qrhs": stored}}}, x, kernel, dims)


def _captured_inputs(model_cfg: ModelConfig, params: dict, tokens, paths: list[Path]) -> dict[Path, jax.Array]:
    """Each listed layer's input x: [batch, seq, in] when the float model runs on tokens."""
    model = Transformer(model_cfg, matmul=make_matmul(model_cfg, QuantConfig(), "none",
                                                      hooks=(capture_inputs(collection=INPUTS),)))
    _, captured = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=[INPUTS]))(params, tokens)
    inputs = {}
    for path in paths:
        if path == EMBED_PATH:  # the float model looks the table up; quantized, it is one_hot(tokens) @ table
            inputs[path] = jax.nn.one_hot(tokens, model_cfg.vocab_size)
            continue
        node = captured[INPUTS]
        for key in path + ("dot_general", "x"):
            node = node[key]
        inputs[path] = node
    return inputs


GGML_LEVELS = {ggml.Q8_0: (-127, 127), ggml.Q4_0: (-8, 7)}  # the integer codes each ggml block format stores


def _clipped_share(weights: np.ndarray, scale: np.ndarray, plan: LayerPlan) -> float:
    """Share of `weights` (as quantized, [..., in, out]) beyond the largest integer level of `scale` (broadcast to
    them). AQT: |w| / scale above the top level (the top half step, see `LayerReport.clipped`). ggml: w / d, d
    signed, more than half a step outside the block format's codes (Q4_0: above 7.5, below -8.5)."""
    if plan.scheme == "aqt":
        return float(np.mean(np.abs(weights) / scale > 2 ** (plan.weight_bits - 1) - 1))
    low, high = GGML_LEVELS[plan.scheme]
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block has d = 0: 0 / 0 is not clipped
        steps = weights / scale.astype(np.float32)
    return float(np.mean((steps > high + 0.5) | (steps < low - 0.5)))


def layer_report(model_cfg: ModelConfig, quant_cfg: QuantConfig, params: dict, tokens, stored: dict | None = None,
                 fold: dict | None = None, kl_tokens=None, fold_out: dict | None = None,
                 log: Callable[[str], None] | None = None) -> list[LayerReport]:
    """One row per quantized weight layer, in model order. params: the float "params" collection; tokens: [batch,
    seq] int, the batch whose activations the outputs are measured on.

    stored: a serving run's {layer path: its stored {"value", "scale"}} (`quant.serving.quantized_weights`), made
    from these params by any method; the rows then report those integers, else AQT's round-to-nearest of params
    (for a ggml scheme's layer, `quant.ggml.quantize`: the blocks quant.convert and gguf write).
    fold: {layer path: s [in] float}, the input scales a method folded in (AWQ, SmoothQuant): its stored integers
    quantize kernel * s[:, None] and read x / s. Weight errors compare the weight the integers stand for in the
    params' coordinates, dequantized / s[:, None], with the float kernel; output errors the layer's quantized
    output on x / s with x @ kernel. kl_tokens: int [windows, seq] for the `kl_mean` column (`quant.layer_kl`;
    None leaves it None). fold_out: {layer path: o [out] float}, output columns a method divided by the next
    layer's input scales (v before o, up before down): the integers then quantize kernel * s[:, None] / o.
    log: progress lines of a long KL measurement (`quant.layer_kl.single_layer_kl`).
    """
    plan = make_plan(model_cfg, quant_cfg)
    params = nn.unbox(params)
    paths = weight_layers(plan)
    inputs = _captured_inputs(model_cfg, params, tokens, paths)
    numerics = resolve_numerics(quant_cfg.numerics)
    rows, effective = [], {}
    for path in paths:
        layer_plan, x = plan[path], inputs[path]
        kernel = np.asarray(get_param(params, path + (kernel_name(path),)), np.float32)
        s = np.ones(kernel.shape[0], np.float32) if fold is None or path not in fold else np.asarray(fold[path])
        o = np.ones(kernel.shape[1], np.float32) if fold_out is None or path not in fold_out else np.asarray(
            fold_out[path])
        if stored is None and layer_plan.scheme != "aqt":  # ggml blocks: gguf's own quantizer, as convert uses
            codes, d = ggml.quantize(kernel, layer_plan.scheme)
            frozen = {"value": codes, "scale": d[:, None, None, :]}
            y_quant = x @ ggml.dequantize(codes, d).astype(x.dtype)
        elif stored is None:
            y_quant, frozen = _quantize_layer(x, kernel, layer_plan, numerics)
        else:
            frozen = stored[path]
            x = x / jnp.asarray(s, x.dtype)
            y_quant = (x @ dequantize(frozen["value"], frozen["scale"]) if layer_plan.act_bits is None
                       else _serve_layer(x, frozen, layer_plan, numerics))
        value, scale = np.asarray(frozen["value"]).astype(np.float32), np.asarray(frozen["scale"])
        scaled = kernel * s[:, None] / o[None, :]
        clipped = _clipped_share(scaled.reshape(value.shape), scale.reshape(value.shape[:-2] + (1, value.shape[-1])),
                                 layer_plan)
        effective[path] = (dequantize(value, scale) / s[:, None] * o[None, :]).astype(np.float32)
        weight_sqnr, weight_err = _errors(kernel, effective[path])
        output_sqnr, output_err = _errors(np.asarray(x) @ scaled, np.asarray(y_quant))
        rows.append(LayerReport(
            path_str(path), layer_plan.weight_bits, layer_plan.act_bits,
            layer_plan.scheme if layer_plan.scheme != "aqt" else
            layer_plan.granularity if layer_plan.group_size is None else f"per_group({layer_plan.group_size})",
            float(scale.min()), float(scale.max()), clipped,
            weight_sqnr, weight_err, output_sqnr, output_err))
    if kl_tokens is not None:
        kl = single_layer_kl(model_cfg, params, effective, kl_tokens, log)
        rows = [dataclasses.replace(row, kl_mean=kl[path]["kl_mean"]) for row, path in zip(rows, paths)]
    return rows


CLIPPED_LEGEND = ("clipped: share of the layer's weights beyond the largest integer level, which rounding to that "
                  "level moves by at most half a step (abs-max scales put each channel's or group's max there); "
                  "about 1/in_features (1/group_size) is expected, much more would mean a clipping calibration")


KL_LEGEND = ("KL: layer sensitivity, KL(float || quantized) in nats of the next-token distribution, mean over the "
             "tokens of the KL windows, with ONLY this layer's weight quantized (every other layer float; activation "
             "quantization not applied); '-' when not measured")


def format_report(rows: list[LayerReport]) -> str:
    """The report as an aligned text table, then a blank line and the legends of its "KL" and "clipped" columns."""
    header = ("layer", "w", "a", "scales", "scale min", "scale max", "clipped", "w SQNR dB", "w rel err",
              "out SQNR dB", "out rel err", "KL")
    table = [header] + [(
        r.layer, f"int{r.weight_bits}", "float" if r.act_bits is None else f"int{r.act_bits}", r.granularity,
        f"{r.scale_min:.3g}", f"{r.scale_max:.3g}", f"{100 * r.clipped:.2f}%", f"{r.weight_sqnr_db:.1f}",
        f"{r.weight_rel_err:.4f}", f"{r.output_sqnr_db:.1f}", f"{r.output_rel_err:.4f}",
        "-" if r.kl_mean is None else f"{r.kl_mean:.2e}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", KL_LEGEND, CLIPPED_LEGEND])
