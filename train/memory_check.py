"""Refusing work that cannot fit in this machine's memory, in one line, before it starts.

Sizes pass the config's range checks one by one (`train.batch_size=2000000000`, `model.d_model=2000000000`,
`train.generate --num-samples 1000000000`, `train.evaluate --batch-size 100000` at a large vocabulary), yet together
need terabytes: such a run used to grow until the kernel's out-of-memory killer ended it (or another process), abort
in C++ on an overflowing shape, or end in a numpy or XLA allocation traceback (RESOURCE_EXHAUSTED). Work a
command-line option sizes is refused naming the option and the largest value that could fit. The figures here are
lower bounds (the arrays the work must hold at once, nothing for XLA's temporaries), so a refusal is always right;
work that passes may still not fit. They are checked against the host's physical memory on the CPU backend only: an
accelerator's memory is its own, and XLA reports running out of it.
"""
from __future__ import annotations

import os
from typing import Callable

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


def cpu_memory() -> int | None:
    """The memory `check_fits` checks against: this machine's physical memory on the CPU backend, else None."""
    return physical_memory() if jax.default_backend() == "cpu" else None


def check_fits(nbytes: int, what: str, hint: str = "") -> None:
    """UserError when `nbytes`, a lower bound of what `what` holds at once, exceeds the physical memory (CPU backend
    only; see the module docstring); `hint` ends the message (e.g. what would fit)."""
    total = cpu_memory()
    if total and nbytes > total:
        raise UserError(f"{what} needs at least {nbytes / 1e9:,.1f} GB of memory, more than this machine's "
                        f"{total / 1e9:,.1f} GB{hint}")


def check_option_fits(option: str, value: int, bytes_at: Callable[[int], int], what: str) -> None:
    """`check_fits` for work a command-line option sizes: `bytes_at(n)` is the lower bound at `option` n (never
    smaller for a larger n), checked at `value`. The refusal names the option and the largest value whose bound
    fits (found by bisection), or says that none does."""
    total = cpu_memory()
    if not total or bytes_at(value) <= total:
        return
    fits, over = 0, value  # bytes_at(fits) fits (0: none known), bytes_at(over) does not
    while over - fits > 1:
        mid = (fits + over) // 2
        fits, over = (mid, over) if bytes_at(mid) <= total else (fits, mid)
    hint = (f"; use {option} {fits:,} or less" if fits else
            f"; no {option} fits: what it holds besides is already too large")
    check_fits(bytes_at(value), f"{what} at {option} {value:,}", hint)


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


def forward_bytes(model: ModelConfig, batch: int, held_bytes: int, queries: int | None = None) -> int:
    """A lower bound of a forward pass's memory, bytes: what is held besides (`held_bytes`: the parameters, results
    kept), the float32 logits [batch, queries, vocab] and one layer's attention probabilities [batch, n_heads,
    queries, queries] (see `attention_bytes`); queries: tokens per window (default model.seq_len)."""
    queries = queries or model.seq_len
    return held_bytes + F32 * batch * queries * model.vocab_size + attention_bytes(model, batch, queries, queries)


def training_bytes(model: ModelConfig, batch_size: int, trains_params: bool = True) -> int:
    """A lower bound of a training step's memory, bytes: one micro-batch's forward (`forward_bytes`) and the float32
    gradient of its logits [batch_size, seq_len, vocab] and, when the step trains the parameters (not LoRA adapters
    over a frozen, maybe integer, base), the float32 parameters with AdamW's two moments and a gradient (4
    copies)."""
    params = 4 * model_params(model) if trains_params else 0
    return forward_bytes(model, batch_size, F32 * params) + F32 * batch_size * model.seq_len * model.vocab_size


def generation_bytes(model: ModelConfig, samples: int, cache_bytes: int, prompt_len: int, new_tokens: int,
                     cache_slots: int = 0) -> int:
    """A lower bound of `generate`'s memory, bytes: the KV cache (`cache_bytes`), the float32 logits of the prompt
    [samples, prompt_len, vocab], the tokens made [samples, new_tokens] (int32) and the prompt's attention
    probabilities over the cache's `cache_slots` slots in one layer (see `attention_bytes`)."""
    return (cache_bytes + F32 * samples * (prompt_len * model.vocab_size + new_tokens)
            + attention_bytes(model, samples, prompt_len, cache_slots))
