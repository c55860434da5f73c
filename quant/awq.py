"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
scale up the input channels that carry large activations before weight quantization (and the input down by as
much, folded into the op before), so the weights that matter most lose less to rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from quant.calibrate import InputStats
from quant.folding import InputGroup, fold_scales, get_param, input_groups, per_channel
from quant.grid import dequantize, rtn
from quant.plan import LayerPlan, Plan, path_str
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class AWQSettings:
    grid: int = 20  # alpha searched over {0, 1/grid, ..., (grid - 1)/grid}, as the paper's n_grid

    def __post_init__(self):
        if self.grid <= 0:
            raise UserError(f"AWQ grid must be a positive number of alpha steps, got {self.grid}")


def group_error(kernels: Sequence[np.ndarray], plans: Sequence[LayerPlan | None], xtx: np.ndarray,
                scales: np.ndarray) -> float:
    """sum over the layers of ||X W - (X / s) Q(s W)||^2 (s scaling input rows, Q = AQT's round-to-nearest in the
    layer's plan), computed from xtx = X^T X [in, in] alone. kernels: [in, out] each; scales: [in] positive."""
    total = 0.0
    for kernel, plan in zip(kernels, plans):
        if plan is None:
            continue
        scaled = (kernel * scales[:, None]).astype(np.float32)
        codes, grid_scales = rtn(scaled, plan.weight_bits, plan.group_size, plan.scale_dtype)
        delta = kernel - dequantize(codes, grid_scales) / scales[:, None]
        total += float(np.sum(delta * (xtx @ delta)))
    return total


def search_scales(kernels: Sequence[np.ndarray], plans: Sequence[LayerPlan | None], stats: InputStats,
                  group: InputGroup, settings: AWQSettings = AWQSettings()) -> tuple[np.ndarray, float, float]:
    """The paper's scale search for one input group: s = mean|x|^alpha per channel (normalised so that
    max(s) * min(s) = 1), alpha chosen on the grid to minimise `group_error` on the calibration inputs.

    alpha = 0 is plain round-to-nearest, so the result is never worse than RTN on the calibration set.
    Returns (scales [group.channels] float64, alpha, error relative to RTN's).
    """
    salience = np.maximum(per_channel(stats.mean_abs, group, "mean"), 1e-4)
    best = None
    for step in range(settings.grid):
        alpha = step / settings.grid
        scales = salience ** alpha
        scales = scales / np.sqrt(scales.max() * scales.min())
        error = group_error(kernels, plans, stats.xtx, scales[group.expand])
        if step == 0:
            rtn_error = error
        if best is None or error < best[2]:
            best = (scales, alpha, error)
    return best[0], best[1], best[2] / rtn_error if rtn_error > 0 else 1.0


def apply_awq(model_cfg: ModelConfig, plan: Plan, params: dict, stats: dict, settings: AWQSettings = AWQSettings()
              ) -> tuple[dict, dict[str, dict]]:
    """Search and fold AWQ scales for every input group with a quantized weight layer, in model order.

    params: float params (nested dict of arrays); stats: {first layer path of each group: InputStats of its input
    in the float model}. Returns (new params, {group's first layer: {"alpha", "error_vs_rtn"}}). The float model
    computes the same function before and after (up to float rounding).
    """
    chosen = {}
    for group in input_groups(model_cfg):
        plans = [plan.get(layer) for layer in group.layers]
        if all(p is None for p in plans):
            continue
        kernels = [get_param(params, layer + ("kernel",)).astype(np.float64) for layer in group.layers]
        scales, alpha, ratio = search_scales(kernels, plans, stats[group.layers[0]], group, settings)
        params = fold_scales(params, group, scales)
        chosen[path_str(group.layers[0])] = {"alpha": alpha, "error_vs_rtn": round(ratio, 4)}
    return params, chosen
