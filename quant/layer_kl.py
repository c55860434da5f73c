"""Layer sensitivity by KL divergence: how far the model's next-token distribution moves from the float model's when
ONLY one layer's weight is quantized and every other layer stays float. It ranks layers by what their rounding
costs the model, next to `quant.layer_report`'s per-layer weight and output errors.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from quant.folding import get_param, set_param
from quant.kl import kl_summary, token_kl
from quant.plan import Path, kernel_name, path_str
from quant.progress import GroupProgress
from slm_jax.config import ModelConfig
from slm_jax.model import Transformer


# Seconds between progress lines of a long KL measurement (none for one that ends sooner).
PROGRESS_EVERY_S = 10.0


def single_layer_kl(model_cfg: ModelConfig, params: dict, kernels: dict[Path, np.ndarray], tokens: np.ndarray,
                    log: Callable[[str], None] | None = None) -> dict[Path, dict[str, float]]:
    """For each layer in `kernels`: KL(float model || float model with only that layer's weight replaced) per
    token, summarised by `quant.kl.kl_summary` ({"kl_mean", "kl_p99" in nats, "top1"}) over all tokens.

    params: the float "params" collection (unboxed nested dict); kernels: {layer path: the float kernel [in, out]
    (the embedding table [vocab, d_model]) its quantized integers stand for, dequantized, in params' coordinates};
    tokens: int [windows, seq], run one window at a time (one compiled forward for all layers; logits held per
    window only). Only weights are quantized: activation quantization (act_bits) is not applied. `log`: a progress
    line every PROGRESS_EVERY_S seconds over the windows x (layers + the float reference) forward passes.
    """
    model = Transformer(model_cfg)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    windows = [np.asarray(w, np.int32)[None] for w in tokens]
    progress = GroupProgress("per-layer KL", len(windows) * (len(kernels) + 1), log, "window", PROGRESS_EVERY_S)

    def forward(p: dict, w: np.ndarray, name: str) -> np.ndarray:
        out = np.asarray(logits(p, w))
        progress.step(name)
        return out

    reference = [forward(params, w, "float model") for w in windows]
    out = {}
    for path, kernel in kernels.items():
        name = path + (kernel_name(path),)
        replaced = set_param(params, name, jnp.asarray(kernel, get_param(params, name).dtype))
        kl, agree = zip(*(token_kl(ref, forward(replaced, w, path_str(path))) for ref, w in zip(reference, windows)))
        out[path] = kl_summary(np.concatenate([k.ravel() for k in kl]), np.concatenate([a.ravel() for a in agree]))
    return out
