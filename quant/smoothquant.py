"""SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models"): move activation outliers into the weights with per-channel scales
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the op before, so W8A8's per-token activation scales
are not ruined by a few huge channels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from quant.calibrate import InputStats
from quant.folding import InputGroup, fold_scales, get_param, input_groups, per_channel
from quant.plan import Plan, path_str
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError


def smoothing_scales(kernels: Sequence[np.ndarray], stats: InputStats, group: InputGroup,
                     alpha: float) -> np.ndarray:
    """s [group.channels] = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|W_j| over every kernel row fed by
    channel j (all of the group's layers, as the paper concatenates q, k and v); both maxima clamped to 1e-5."""
    act = np.maximum(per_channel(stats.abs_max, group, "max"), 1e-5)
    weight = np.max([per_channel(np.max(np.abs(k), axis=1), group, "max") for k in kernels], axis=0)
    return act ** alpha / np.maximum(weight, 1e-5) ** (1 - alpha)


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"SmoothQuant alpha (migration strength) must be in [0, 1], got {alpha}")


def apply_smoothquant(model_cfg: ModelConfig, plan: Plan, params: dict, stats: dict,
                      alpha: float = 0.5) -> tuple[dict, dict[str, dict]]:
    """Fold smoothing scales into every input group with a layer whose activations are quantized (act_bits).

    params: float params; stats: {first layer path of each group: InputStats of its input in the float model}.
    Returns (new params, {group's first layer: {"act_max_before", "act_max_after", "scales" (the folded s,
    [group.channels] floats: the layers' input is divided by s[group.expand], their kernel rows multiplied)}}).
    Raises UserError when no layer quantizes its activations (SmoothQuant is for W8A8-style schemes) or alpha is
    outside [0, 1].
    """
    check_alpha(alpha)
    chosen = {}
    for group in input_groups(model_cfg):
        if not any(plan.get(layer) is not None and plan[layer].act_bits is not None for layer in group.layers):
            continue
        kernels = [get_param(params, layer + ("kernel",)) for layer in group.layers]
        group_stats = stats[group.layers[0]]
        scales = smoothing_scales(kernels, group_stats, group, alpha)
        params = fold_scales(params, group, scales)
        act = per_channel(group_stats.abs_max, group, "max")
        chosen[path_str(group.layers[0])] = {"act_max_before": float(act.max()),
                                             "act_max_after": float((act / scales).max()),
                                             "scales": [float(v) for v in scales]}
    if not chosen:
        raise UserError("SmoothQuant migrates activation outliers into the weights: it needs a scheme that "
                        "quantizes activations (act_bits, e.g. --bits 8 --act-bits 8)")
    return params, chosen
