"""How far a quantized model's next-token distribution moves from its float parent's: KL(float || quantized) per
token (mean and 99th percentile, since quantization damage is concentrated in few tokens) and top-1 agreement.
"""
from __future__ import annotations

import numpy as np
import scipy.special


def token_kl(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: KL(softmax(ref) || softmax(logits)) in nats, and whether both argmaxes agree.

    ref_logits, logits: [batch, seq, vocab] (the float parent's first). Computed in float64.
    Returns (kl float64 [batch, seq], agree bool [batch, seq]).
    """
    if np.shape(ref_logits) != np.shape(logits):
        raise ValueError(f"logits shapes differ: {np.shape(ref_logits)} vs {np.shape(logits)}")
    ref = scipy.special.log_softmax(np.asarray(ref_logits, np.float64), axis=-1)
    quant = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
    kl = np.sum(np.exp(ref) * (ref - quant), axis=-1)
    return np.maximum(kl, 0.0), np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)


def kl_summary(kl: np.ndarray, agree: np.ndarray) -> dict[str, float]:
    """{"kl_mean", "kl_p99" (nats, over all tokens given), "top1" (share of tokens whose argmax agrees)}."""
    kl, agree = np.ravel(kl), np.ravel(agree)
    return {"kl_mean": float(np.mean(kl)), "kl_p99": float(np.percentile(kl, 99)), "top1": float(np.mean(agree))}


def compare_logits(ref_logits: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """`kl_summary` of `token_kl` for one pair of logits arrays [batch, seq, vocab]."""
    return kl_summary(*token_kl(ref_logits, logits))
