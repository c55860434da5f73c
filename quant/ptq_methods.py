"""Post-training quantization by method: round-to-nearest (AQT's CONVERT), GPTQ, AWQ, AWQ then GPTQ, and
SmoothQuant for W8A8. Every method writes the same serving variables (AQT's integer weights and scales); only the
integers and scales differ, so everything that reads a serving run works unchanged.
"""
from __future__ import annotations

import dataclasses
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from quant.awq import AWQSettings, apply_awq
from quant.calibrate import collect_input_stats
from quant.config import QuantConfig
from quant.serving import (check_serving_variables, convert, quantized_weights, replace_quantized_weights,
                           weight_layers)
from quant.serving import dequantize as dequantize_aqt
from quant.folding import get_param, input_groups
from quant.gptq import GPTQSettings, gptq
from quant.grid import dequantize
from quant.plan import EMBED_PATH, make_plan, path_str
from quant.progress import GroupProgress
from quant.smoothquant import apply_smoothquant, check_alpha
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant")


@dataclasses.dataclass(frozen=True)
class PTQSettings:
    gptq: GPTQSettings = GPTQSettings()
    awq: AWQSettings = AWQSettings()
    smoothquant_alpha: float = 0.5
    chunk: int = 16  # calibration sequences per forward pass

    def to_json(self, method: str) -> dict:
        """The settings that `method` uses, JSON-able (for the serving run's metadata)."""
        out = {}
        if "gptq" in method:
            out["gptq"] = dataclasses.asdict(self.gptq)
        if "awq" in method:
            out["awq"] = dataclasses.asdict(self.awq)
        if method == "smoothquant":
            out["smoothquant"] = {"alpha": self.smoothquant_alpha}
        return out


def check_method(model_cfg: ModelConfig, quant_cfg: QuantConfig, method: str, calib_tokens,
                 settings: PTQSettings = PTQSettings()) -> None:
    """UserError, before any work, when `method` cannot apply: unknown; calibration missing or longer than the
    model's context; no quantized weight layer to work on (a scheme quantizing only activations, or nothing);
    GPTQ with no damping and fewer calibration tokens than a layer's inputs (`check_undamped_calibration`);
    SmoothQuant with no activation quantization (act_bits)."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "rtn":
        return
    if calib_tokens is None or len(calib_tokens) == 0:
        raise UserError(f"--method {method} needs calibration tokens (--calib-batches, --calib-seq-len)")
    if np.shape(calib_tokens)[1] > model_cfg.context:  # the attention window, beyond an imported run's seq_len
        where = "model.max_context" if model_cfg.max_context else "model.seq_len"
        raise UserError(f"--calib-seq-len {np.shape(calib_tokens)[1]:,} is longer than the model's context "
                        f"({where} {model_cfg.context:,})")
    plan = make_plan(model_cfg, quant_cfg)
    weights = [path for path in weight_layers(plan) if path != EMBED_PATH]
    if not weights:
        raise UserError(f"--method {method} chooses integer weights, but this scheme quantizes no weight layer "
                        f"(only activations, the embedding table, or nothing); use --method rtn")
    if "gptq" in method and settings.gptq.damp == 0:
        check_undamped_calibration(model_cfg, quant_cfg, calib_tokens)
    if method == "smoothquant":
        check_alpha(settings.smoothquant_alpha)
        if not any(plan[path].act_bits is not None for path in weights):
            raise UserError("--method smoothquant migrates activation outliers into the weights: it needs a scheme "
                            "that quantizes activations (act_bits, e.g. --bits 8 --act-bits 8)")


def quantize_with_method(model_cfg: ModelConfig, quant_cfg: QuantConfig, params: dict, method: str,
                         calib_tokens: np.ndarray | None = None, settings: PTQSettings = PTQSettings(),
                         log=None) -> tuple[dict, dict]:
    """Serving variables ({"params", "aqt"}, as `quant.serving.convert` returns) for float `params` quantized to
    `quant_cfg` by `method`, and a JSON-able record of what was done for the run's metadata: method, settings,
    calibration amount, per-group/per-layer results and seconds taken.

    calib_tokens: int [sequences, seq_len] from the training split (`quant.calibrate.calibration_tokens`); unused by
    rtn. AWQ and SmoothQuant fold scales into the float params (same float function), then round to nearest or,
    for awq+gptq, run GPTQ. GPTQ calibrates sequentially: each group of layers sharing an input gets its Hessian
    from the serving model whose earlier layers already hold their GPTQ integers. The token embedding table, when
    quantized, is always rounded to nearest (its one-hot inputs make GPTQ and AWQ no-ops there). `log` (a
    callable taking one line, or None) gets a progress line after each layer group of AWQ's search and GPTQ, and
    GPTQ's note on too few calibration tokens (`gptq_rank_note`, also the record's "note"). Raises UserError for
    inapplicable input (see `check_method`) before any work.
    """
    check_method(model_cfg, quant_cfg, method, calib_tokens, settings)
    start = time.perf_counter()
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(flax.core.unfreeze(nn.unbox(params))))
    plan = make_plan(model_cfg, quant_cfg)
    record: dict = {"method": method, "settings": settings.to_json(method)}
    if method in ("awq", "awq+gptq", "smoothquant"):
        firsts = [group.layers[0] for group in input_groups(model_cfg)]
        stats = collect_input_stats(model_cfg, QuantConfig(mode="none"), {"params": params}, calib_tokens, firsts,
                                    settings.chunk)
        if method == "smoothquant":
            params, record["groups"] = apply_smoothquant(model_cfg, plan, params, stats, settings.smoothquant_alpha)
        else:
            params, record["groups"] = apply_awq(model_cfg, plan, params, stats, settings.awq, log=log)
    variables = convert(model_cfg, quant_cfg, params)
    if "gptq" in method:
        note = gptq_rank_note(model_cfg, quant_cfg, calib_tokens, settings.gptq.damp)
        if note:
            record["note"] = note
            if log:
                log(note)
        variables, record["layers"] = apply_gptq(model_cfg, quant_cfg, params, variables, calib_tokens, settings,
                                                 log=log)
        check_serving_variables(model_cfg, quant_cfg, variables)
    if method != "rtn":
        record["calibration"] = {"split": "train", "sequences": int(len(calib_tokens)),
                                 "seq_len": int(np.shape(calib_tokens)[1]), "tokens": int(np.size(calib_tokens))}
    record["seconds"] = round(time.perf_counter() - start, 2)
    return variables, record


def gptq_widths(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> list[tuple[int, str]]:
    """(inputs, layer name) of every weight layer GPTQ quantizes, in the order it quantizes them (model order)."""
    plan = make_plan(model_cfg, quant_cfg)
    return [(len(group.expand), path_str(layer)) for group in input_groups(model_cfg) for layer in group.layers
            if plan.get(layer) is not None]


def check_undamped_calibration(model_cfg: ModelConfig, quant_cfg: QuantConfig, calib_tokens: np.ndarray) -> None:
    """UserError naming the first layer GPTQ would fail on when it runs with no damping (--damp 0) on fewer
    calibration tokens (sequences x seq_len) than that layer has inputs: H = 2 X^T X / tokens then has rank at most
    the token count, so the undamped Hessian cannot be inverted, and GPTQ would stop at that layer after quantizing
    the ones before it. The line says how many --calib-batches cover the widest layer, or to give a positive damp.
    More tokens than inputs is necessary, not sufficient: repeated tokens can still leave a Hessian singular, which
    `quant.gptq.inverse_hessian_factor` reports when GPTQ reaches the layer."""
    sequences, seq_len = np.shape(calib_tokens)
    tokens, widths = sequences * seq_len, gptq_widths(model_cfg, quant_cfg)
    short = [(width, name) for width, name in widths if width > tokens]
    if not short:
        return
    width, name = short[0]
    need = -(-max(w for w, _ in widths) // seq_len)
    raise UserError(f"GPTQ with --damp 0 cannot invert the Hessian of {name}: its {width:,} inputs need at least "
                    f"{width:,} calibration tokens, and --calib-batches {sequences:,} x --calib-seq-len {seq_len:,} "
                    f"give {tokens:,}; use --calib-batches {need:,} or more, or a positive --damp "
                    f"(default {GPTQSettings.damp})")


def gptq_rank_note(model_cfg: ModelConfig, quant_cfg: QuantConfig, calib_tokens: np.ndarray,
                   damp: float) -> str | None:
    """A one-line note when GPTQ's Hessians must be singular: the calibration's tokens (sequences x seq_len) are
    fewer than the inputs of the widest layer it quantizes (H = 2 X^T X / tokens has rank at most the token count),
    so the damping term alone decides the rest of the solve; None when there are enough tokens. With no damping
    (damp 0) this calibration is refused before any work instead (`check_undamped_calibration`), so the note is
    never followed by an error about the same shortage. GPTQ's paper calibrates on 128 sequences of 2,048 tokens."""
    tokens, widths = int(np.size(calib_tokens)), gptq_widths(model_cfg, quant_cfg)
    width = max((w for w, _ in widths), default=0)
    if tokens >= width:
        return None
    layer = next(name for w, name in widths if w == width)  # the first in model order
    return (f"note: GPTQ calibrates on {tokens:,} token{'s' if tokens != 1 else ''}, fewer than the {width:,} inputs "
            f"of {layer}: its Hessian has rank at most {tokens:,} and the damping ({damp:g} of its mean diagonal) "
            f"decides the rest; use more calibration tokens (--calib-batches, --calib-seq-len)")


def apply_gptq(model_cfg: ModelConfig, quant_cfg: QuantConfig, params: dict, variables: dict,
               calib_tokens: np.ndarray, settings: PTQSettings = PTQSettings(), log=None) -> tuple[dict, dict]:
    """Replace the round-to-nearest integers in serving `variables` by GPTQ's, group of layers by group of layers
    in model order, each group's Hessian taken from the serving model as quantized so far; `log` (or None) gets a
    progress line after each group.

    params: the float params the variables were converted from. Returns (variables, {layer: {"objective_vs_rtn":
    ||X(W - Q_gptq)||^2 / ||X(W - Q_rtn)||^2 on the calibration inputs}}).
    """
    plan = make_plan(model_cfg, quant_cfg)
    serve = dataclasses.replace(quant_cfg, mode="serve")
    detail, groups = {}, input_groups(model_cfg)
    firsts = [group.layers[0] for group in groups]  # all measured on every pass: one compiled forward for all
    progress = GroupProgress("gptq", sum(any(plan.get(layer) for layer in g.layers) for g in groups), log)
    for group in groups:
        layers = [layer for layer in group.layers if plan.get(layer) is not None]
        if not layers:
            continue
        stats = collect_input_stats(model_cfg, serve, variables, calib_tokens, firsts, settings.chunk)
        hessian = stats[group.layers[0]].hessian
        stored = quantized_weights(variables["aqt"])
        new = {}
        for layer in layers:
            layer_plan, kernel = plan[layer], get_param(params, layer + ("kernel",))
            codes, scales = gptq(kernel, hessian, layer_plan.weight_bits, layer_plan.group_size,
                                 layer_plan.scale_dtype, settings.gptq, name=path_str(layer))
            new[layer] = aqt_layout(codes, scales, stored[layer])
            rtn_kernel = dequantize_aqt(stored[layer]["value"], stored[layer]["scale"])
            ratio = _objective(kernel, dequantize(codes, scales), hessian) / _objective(kernel, rtn_kernel, hessian)
            detail[path_str(layer)] = {"objective_vs_rtn": round(float(ratio), 4)}
        variables = {**variables, "aqt": replace_quantized_weights(variables["aqt"], new)}
        progress.step(path_str(group.layers[0]))
    return variables, detail


def aqt_layout(codes: np.ndarray, scales: np.ndarray, stored: dict) -> dict:
    """codes [in, out] and scales [groups, out] in the shapes and dtypes of AQT's stored {"value", "scale"}."""
    value, scale = stored["value"], stored["scale"]
    return {"value": codes.reshape(value.shape).astype(jnp.dtype(value.dtype)),
            "scale": scales.reshape(scale.shape).astype(jnp.dtype(scale.dtype))}


def _objective(kernel: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    delta = np.asarray(kernel, np.float64) - quantized
    return float(np.sum(delta * (hessian @ delta)))

