"""Where per-input-channel scales fold into a Llama-style model without changing its float function: the layers that
share one input, and the op before them that can divide that input by s while their kernel rows multiply by s.

AWQ and SmoothQuant choose the scales; this module knows the model's structure and applies them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from quant.plan import Path
from slm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Weight layers that read the same input x [..., in], in model order, and how to rescale that input.

    `source` is the parameter that produces x's channels: an RMSNorm's "scale" ([in]) or a Linear's "kernel"
    whose output columns are x's channels (v before o, up before down). `expand` maps each of the layers' input
    channels to its scale entry: the identity, except for o under grouped-query attention, whose n_heads * head_dim
    inputs come from kv_heads * head_dim columns of v (every query head of a group reads its kv head's values).
    """

    layers: tuple[Path, ...]
    source: tuple[str, ...]  # parameter path of the norm scale or producing kernel
    expand: np.ndarray  # [in] int: scale index of each input channel of `layers`

    @property
    def channels(self) -> int:
        """Number of independent scales (the source's output channels)."""
        return int(self.expand.max()) + 1


def input_groups(model_cfg: ModelConfig) -> list[InputGroup]:
    """Every group of weight layers sharing an input, in the order the model runs them; the LM head only when it
    is untied (a tied head reads the float embedding table). The embedding table is in no group."""
    cfg, identity = model_cfg, lambda n: np.arange(n)
    group = cfg.n_heads // cfg.kv_heads
    heads_to_kv = ((np.arange(cfg.n_heads) // group)[:, None] * cfg.head_dim + np.arange(cfg.head_dim)).ravel()
    groups = []
    for i in range(cfg.n_layers):
        layer = f"layer_{i}"
        attn, mlp = (layer, "attn"), (layer, "mlp")
        groups += [
            InputGroup((attn + ("q",), attn + ("k",), attn + ("v",)), (layer, "attn_norm", "scale"),
                       identity(cfg.d_model)),
            InputGroup((attn + ("o",),), attn + ("v", "kernel"), heads_to_kv),
            InputGroup((mlp + ("gate",), mlp + ("up",)), (layer, "mlp_norm", "scale"), identity(cfg.d_model)),
            InputGroup((mlp + ("down",),), mlp + ("up", "kernel"), identity(cfg.hidden)),
        ]
    if not cfg.tie_embeddings:
        groups.append(InputGroup((("lm_head",),), ("final_norm", "scale"), identity(cfg.d_model)))
    return groups


def get_param(params: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        params = params[key]
    return np.asarray(params)


def set_param(params: dict, path: tuple[str, ...], value: np.ndarray) -> dict:
    """A copy of the nested dict `params` with the leaf at `path` replaced (other leaves shared)."""
    head, *rest = path
    return {**params, head: set_param(params[head], tuple(rest), value) if rest else value}


def fold_scales(params: dict, group: InputGroup, scales: np.ndarray) -> dict:
    """params with the group's input divided by `scales` ([group.channels], positive) at its source and the
    layers' kernel rows multiplied by them (expanded), so x @ W is unchanged in exact arithmetic. Returns a new
    tree in the params' dtypes; the input `params` is not modified."""
    scales = np.asarray(scales, np.float64)
    source = get_param(params, group.source)
    if source.ndim == 1:  # an RMSNorm scale: its output channel c is multiplied by source[c]
        new_source = source / scales
    else:  # a producing kernel [in, channels]: divide its output columns
        new_source = source / scales[None, :]
    params = set_param(params, group.source, new_source.astype(source.dtype))
    for layer in group.layers:
        kernel = get_param(params, layer + ("kernel",))
        params = set_param(params, layer + ("kernel",), (kernel * scales[group.expand][:, None]).astype(kernel.dtype))
    return params


def per_channel(values: np.ndarray, group: InputGroup, reduce: str = "max") -> np.ndarray:
    """A statistic of the layers' input channels ([in]) reduced ("max" | "mean") onto the group's scale channels
    ([channels]): the identity unless several inputs share a scale (o under grouped-query attention)."""
    values = np.asarray(values, np.float64)
    if reduce == "mean":
        return np.bincount(group.expand, weights=values) / np.bincount(group.expand)
    out = np.full(group.channels, -np.inf)
    np.maximum.at(out, group.expand, values)
    return out
