"""A tiny grouped-query model with random, non-trivial float params for the PTQ method tests."""
import flax.linen as nn
import jax
import numpy as np

from slm_jax.config import ModelConfig
from slm_jax.model import Transformer

TINY = ModelConfig(vocab_size=61, seq_len=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, mlp_hidden=64,
                   tie_embeddings=False)


def random_params(cfg: ModelConfig = TINY, seed: int = 0) -> dict:
    """Float params with O(1) activations and norm scales away from 1 (numpy leaves)."""
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        fan_in = leaf.shape[0] if path[-1].key == "kernel" else 1
        return (rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)["params"]


def random_tokens(n: int, seq: int = 16, seed: int = 1, cfg: ModelConfig = TINY) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, seq)).astype(np.int32)


def float_logits(params: dict, tokens, cfg: ModelConfig = TINY) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, tokens))
