"""slm-jax: a small decoder-only Transformer whose every matmul takes an injected dot_general."""
from slm_jax.attention import KVCache
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.layers import Linear, MatmulProvider
from slm_jax.model import Transformer

__all__ = ["KVCache", "Linear", "MatmulProvider", "ModelConfig", "Transformer", "UserError"]
