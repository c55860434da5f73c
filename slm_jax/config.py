"""`ModelConfig`: the shape of the Transformer, validated once when it is built."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from slm_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_SCALING_TYPES = ("llama3",)


def check_positive(section, keys: tuple[str, ...], prefix: str) -> None:
    """UserError naming each of `keys` whose value in `section` is not positive, with its value, and no other."""
    bad = {key: getattr(section, key) for key in keys if not getattr(section, key) > 0}
    if bad:
        raise UserError(f"{' and '.join(prefix + key for key in bad)} must be positive, got "
                        f"{' and '.join(str(value) for value in bad.values())}")


def bounded(default, low: int, high: int | None = None):
    """A dataclass field for an integer config value from `low` to `high` (None: up to int32's limit). The bounds
    are metadata the YAML loader words when a value is beyond int32 (train.config_loader); `__post_init__` still
    checks the value itself."""
    return dataclasses.field(default=default, metadata={"min": low, "max": high})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (field names as in Hugging Face's `rope_scaling`): wavelengths longer
    than original_max_position_embeddings / low_freq_factor are divided by `factor`, those shorter than
    original_max_position_embeddings / high_freq_factor are kept, and the band between is interpolated."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = bounded(8192, 1)

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise UserError(f"model.rope_scaling.type must be one of {', '.join(ROPE_SCALING_TYPES)}, "
                            f"got {self.type!r}")
        check_positive(self, ("factor", "original_max_position_embeddings"), "model.rope_scaling.")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise UserError(f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                            f"{self.low_freq_factor} and {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = bounded(256, 1)
    seq_len: int = bounded(128, 1)  # the training window: sequences the model is trained and evaluated on
    n_layers: int = bounded(4, 1)
    n_heads: int = bounded(4, 1)
    n_kv_heads: int | None = bounded(None, 1)  # None: as many as n_heads; fewer gives grouped-query attention
    d_model: int = bounded(128, 1)
    head_size: int | None = bounded(None, 2)  # width of one attention head; None: d_model // n_heads (see `head_dim`)
    # None: the Llama choice, about 8/3 * d_model rounded up to a multiple of 32
    mlp_hidden: int | None = bounded(None, 1)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    # keys a query attends to, and the KV cache's default size; None: seq_len
    max_context: int | None = bounded(None, 1)
    dropout: float = 0.0
    quantize_attention: bool = False  # also route QK^T and attention x V through the injected dot_general

    def __post_init__(self):
        for key in ("vocab_size", "seq_len", "n_layers", "n_heads", "d_model"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if self.head_size is None:
            if self.d_model % self.n_heads:
                raise UserError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}), or "
                                f"set model.head_size")
            if (self.d_model // self.n_heads) % 2:
                raise UserError(f"model.d_model / model.n_heads must be even for rotary embeddings, "
                                f"got {self.d_model // self.n_heads}")
        elif self.head_size <= 0 or self.head_size % 2:
            raise UserError(f"model.head_size must be a positive even integer (rotary embeddings) or null, "
                            f"got {self.head_size}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise UserError(f"model.n_kv_heads ({self.n_kv_heads}) must be positive and divide model.n_heads "
                            f"({self.n_heads})")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise UserError(f"model.mlp_hidden must be a positive integer or null, got {self.mlp_hidden}")
        if self.max_context is not None and self.max_context < self.seq_len:
            raise UserError(f"model.max_context ({self.max_context}) must be null or at least model.seq_len "
                            f"({self.seq_len})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        check_positive(self, ("rope_theta", "norm_eps"), "model.")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def context(self) -> int:
        """The attention window: a query sees at most this many keys, its own included."""
        return self.max_context or self.seq_len

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o and SwiGLU's gate, up and down."""
        d, heads, kv = self.d_model, self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * d * heads + 2 * d * kv + 3 * d * self.hidden

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-int(8 * self.d_model / 3) // 32) * 32
