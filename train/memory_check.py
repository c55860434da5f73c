"""Refusing work that cannot fit in this machine's memory, in one line, before it starts.

Sizes pass the config's range checks one by one (`train.batch_size=2000000000`, `model.d_model=2000000000`,
`train.generate --num-samples 1000000000`), yet together need terabytes: such a run used to grow until the kernel's
out-of-memory killer ended it (or another process), abort in C++ on an overflowing shape, or end in a numpy
allocation traceback. The figures here are lower bounds (the arrays the work must hold at once, nothing for XLA's
temporaries), so a refusal is always right; work that passes may still not fit. They are checked against the host's
physical memory on the CPU backend only: an accelerator's memory is its own, and XLA reports running out of it.
"""
from __future__ import annotations

import os

import jax

from slm_jax.config import ModelConfig
from slm_jax.errors import UserError

F32 = 4  # bytes
HALF = 2  # bytes of the narrowest compute dtype (bfloat16, float16): attention probabilities are at least this wide


def physical_memory() -> int | None:
    """Bytes of this machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """UserError when `nbytes`, a lower bound of what `what` holds at once, exceeds the physical memory (CPU backend
    only; see the module docstring)."""
    total = physical_memory()
    if total and nbytes > total and jax.default_backend() == "cpu":
        raise UserError(f"{what} needs at least {nbytes / 1e9:,.1f} GB of memory, more than this machine's "
                        f"{total / 1e9:,.1f} GB")


def model_params(model: ModelConfig) -> int:
    """Parameters of `model`: embedding, per layer q, k, v, o, gate, up, down and two norm scales, the final norm
    and an untied LM head."""
    d = model.d_model
    head = 0 if model.tie_embeddings else model.vocab_size * d
    return model.vocab_size * d + model.n_layers * (model.layer_matmul_params + 2 * d) + d + head


def attention_bytes(model: ModelConfig, batch: int, queries: int, keys: int) -> int:
    """A lower bound of one attention layer's memory, bytes: its probabilities [batch, n_heads, queries, keys] (the
    model attends with every score materialized, no flash attention), at least 2 bytes each."""
    return HALF * batch * model.n_heads * queries * keys


def training_bytes(model: ModelConfig, batch_size: int, trains_params: bool = True) -> int:
    """A lower bound of a training step's memory, bytes: one micro-batch's float32 logits [batch_size, seq_len,
    vocab] with their gradient, one layer's attention probabilities [batch_size, n_heads, seq_len, seq_len] and,
    when the step trains the parameters (not LoRA adapters over a frozen, maybe integer, base), the float32
    parameters with AdamW's two moments and a gradient (4 copies)."""
    params = 4 * model_params(model) if trains_params else 0
    return (F32 * (params + 2 * batch_size * model.seq_len * model.vocab_size)
            + attention_bytes(model, batch_size, model.seq_len, model.seq_len))


def generation_bytes(model: ModelConfig, samples: int, cache_bytes: int, prompt_len: int, new_tokens: int,
                     cache_slots: int = 0) -> int:
    """A lower bound of `generate`'s memory, bytes: the KV cache (`cache_bytes`), the float32 logits of the prompt
    [samples, prompt_len, vocab], the tokens made [samples, new_tokens] (int32) and the prompt's attention
    probabilities over the cache's `cache_slots` slots in one layer (see `attention_bytes`)."""
    return (cache_bytes + F32 * samples * (prompt_len * model.vocab_size + new_tokens)
            + attention_bytes(model, samples, prompt_len, cache_slots))
