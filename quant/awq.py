"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
scale up the input channels that carry large activations before weight quantization (and the input down by as
much, folded into the op before), so the weights that matter most lose less to rounding; then the paper's second
stage, a per-output-channel (per-group) search of the largest value kept before rounding (weight clipping).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from quant.calibrate import InputStats
from quant.folding import InputGroup, fold_scales, get_param, input_groups, per_channel, set_param
from quant.grid import dequantize, rtn
from quant.plan import LayerPlan, Path, Plan, path_str
from quant.progress import GroupProgress
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class AWQSettings:
    grid: int = 20  # alpha searched over {0, 1/grid, ..., (grid - 1)/grid}, as the paper's n_grid
    clip: bool = True  # the clipping search after scaling (the paper's auto_clip)
    clip_grid: int = 20  # shrink ratios 1 - i/clip_grid for i < max_shrink * clip_grid (1.0, 0.95, ..., 0.55)
    max_shrink: float = 0.5

    def __post_init__(self):
        if self.grid <= 0 or self.clip_grid <= 0:
            raise UserError(f"AWQ grids must be positive numbers of steps, got {self.grid} and {self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise UserError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")

    @property
    def clip_ratios(self) -> np.ndarray:
        """The shrink ratios the clipping search tries, 1.0 first: [max(1, floor(max_shrink * clip_grid))]."""
        return 1 - np.arange(max(1, int(self.max_shrink * self.clip_grid))) / self.clip_grid


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


def search_clip(kernel: np.ndarray, plan: LayerPlan, xtx: np.ndarray, ratios: Sequence[float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The paper's clipping search for one (already scaled) kernel [in, out]: per output channel and per group of
    inputs (the whole input for per-channel scales), the ratio r in `ratios` whose clamp of the weights to
    +-r * max|w| minimises the group's quantized partial-output error sum_tokens (x_g . (w_g - Q(clamp(w_g))))^2,
    computed from xtx = X^T X [in, in] of the calibration inputs (all tokens, where the paper samples 64).

    Q is AQT's round-to-nearest on the layer's grid, whose abs-max scale of a clamped group is r * max|w|.
    The first ratio should be 1.0 (no clipping), so the result is never worse than unclipped on the calibration
    set, per group and channel. Returns (clamped kernel [in, out] float32, chosen ratio [groups, out]).
    """
    kernel = np.asarray(kernel, np.float32)
    fan_in, out = kernel.shape
    size = plan.group_size or fan_in
    groups = fan_in // size
    grouped = kernel.reshape(groups, size, out)
    blocks = np.stack([xtx[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(groups)])
    abs_max = np.max(np.abs(grouped), axis=1, keepdims=True)  # [groups, 1, out]
    best_err = np.full((groups, out), np.inf)
    best_ratio = np.ones((groups, out))
    best = grouped
    for ratio in ratios:
        limit = (abs_max * np.float32(ratio)).astype(np.float32)
        clamped = np.clip(grouped, -limit, limit)
        codes, scales = rtn(clamped.reshape(fan_in, out), plan.weight_bits, plan.group_size, plan.scale_dtype)
        delta = (grouped - dequantize(codes, scales).reshape(groups, size, out)).astype(np.float64)
        err = np.einsum("gio,gij,gjo->go", delta, blocks, delta)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, ratio, best_ratio)
        best = np.where(better[:, None, :], clamped, best)
    return best.reshape(fan_in, out), best_ratio


def _clipped_layers(group: InputGroup) -> list[Path]:
    """The group's layers the clipping search applies to: all but q and k, as the paper (their product's error
    is not the output error the search measures)."""
    return [layer for layer in group.layers if layer[-1] not in ("q", "k")]


def apply_awq(model_cfg: ModelConfig, plan: Plan, params: dict, stats: dict, settings: AWQSettings = AWQSettings(),
              log=None) -> tuple[dict, dict[str, dict]]:
    """Search and fold AWQ scales for every input group with a quantized weight layer, in model order.

    params: float params (nested dict of arrays); stats: {first layer path of each group: InputStats of its input
    in the float model}. Returns (new params, {group's first layer: {"alpha", "error_vs_rtn", "scales" (the folded
    s, [group.channels] floats: the layers' input is divided by s[group.expand], their kernel rows multiplied),
    and with clipping "clip_ratio_mean" (mean chosen ratio over the clipped layers' groups and channels)}}).
    Without clipping the float model computes the same function before and after (up to float rounding); the
    clipping then clamps the clipped layers' scaled kernels (`search_clip`). `log` (or None) gets a progress line
    after each group.
    """
    chosen, groups = {}, input_groups(model_cfg)
    progress = GroupProgress("awq", sum(any(plan.get(layer) for layer in g.layers) for g in groups), log)
    for group in groups:
        plans = [plan.get(layer) for layer in group.layers]
        if all(p is None for p in plans):
            continue
        kernels = [get_param(params, layer + ("kernel",)).astype(np.float64) for layer in group.layers]
        scales, alpha, ratio = search_scales(kernels, plans, stats[group.layers[0]], group, settings)
        params = fold_scales(params, group, scales)
        entry = {"alpha": alpha, "error_vs_rtn": round(ratio, 4)}
        if settings.clip:
            expanded = scales[group.expand]
            xtx = stats[group.layers[0]].xtx / np.outer(expanded, expanded)  # X^T X of the scaled input x / s
            ratios = []
            for layer in _clipped_layers(group):
                if plan.get(layer) is None:
                    continue
                path = layer + ("kernel",)
                clamped, chosen_ratio = search_clip(get_param(params, path), plan[layer], xtx, settings.clip_ratios)
                params = set_param(params, path, clamped.astype(get_param(params, path).dtype))
                ratios.append(chosen_ratio.ravel())
            if ratios:
                entry["clip_ratio_mean"] = round(float(np.mean(np.concatenate(ratios))), 4)
        chosen[path_str(group.layers[0])] = {**entry, "scales": [float(v) for v in scales]}
        progress.step(path_str(group.layers[0]))
    return params, chosen
