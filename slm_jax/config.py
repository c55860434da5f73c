"""`ModelConfig`: the shape of the Transformer, validated once when it is built."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from slm_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads; fewer gives grouped-query attention
    d_model: int = 128
    mlp_hidden: int | None = None  # None: the Llama choice, about 8/3 * d_model rounded up to a multiple of 32
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    quantize_attention: bool = False  # also route QK^T and attention x V through the injected dot_general

    def __post_init__(self):
        for key in ("vocab_size", "seq_len", "n_layers", "n_heads", "d_model"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise UserError(f"model.d_model / model.n_heads must be even for rotary embeddings, "
                            f"got {self.d_model // self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise UserError(f"model.n_kv_heads ({self.n_kv_heads}) must be positive and divide model.n_heads "
                            f"({self.n_heads})")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise UserError(f"model.mlp_hidden must be a positive integer or null, got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise UserError("model.rope_theta and model.norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-int(8 * self.d_model / 3) // 32) * 32
