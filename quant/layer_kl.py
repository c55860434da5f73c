"""Layer sensitivity by KL divergence: how far the model's next-token distribution moves from the float model's when
ONLY one layer's weight is quantized and every other layer stays float. It ranks layers by what their rounding
costs the model, next to `quant.layer_report`'s per-layer weight and output errors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quant.folding import get_param, set_param
from quant.kl import kl_summary, token_kl
from quant.plan import Path, kernel_name
from slm_jax.config import ModelConfig
from slm_jax.model import Transformer


def single_layer_kl(model_cfg: ModelConfig, params: dict, kernels: dict[Path, np.ndarray], tokens: np.ndarray
                    ) -> dict[Path, dict[str, float]]:
    """For each layer in `kernels`: KL(float model || float model with only that layer's weight replaced) per
    token, summarised by `quant.kl.kl_summary` ({"kl_mean", "kl_p99" in nats, "top1"}) over all tokens.

    params: the float "params" collection (unboxed nested dict); kernels: {layer path: the float kernel [in, out]
    (the embedding table [vocab, d_model]) its quantized integers stand for, dequantized, in params' coordinates};
    tokens: int [windows, seq], run one window at a time (one compiled forward for all layers; logits held per
    window only). Only weights are quantized: activation quantization (act_bits) is not applied.
    """
    model = Transformer(model_cfg)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    windows = [np.asarray(w, np.int32)[None] for w in tokens]
    reference = [np.asarray(logits(params, w)) for w in windows]
    out = {}
    for path, kernel in kernels.items():
        name = path + (kernel_name(path),)
        replaced = set_param(params, name, jnp.asarray(kernel, get_param(params, name).dtype))
        kl, agree = zip(*(token_kl(ref, np.asarray(logits(replaced, w))) for ref, w in zip(reference, windows)))
        out[path] = kl_summary(np.concatenate([k.ravel() for k in kl]), np.concatenate([a.ravel() for a in agree]))
    return out
