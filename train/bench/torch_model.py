"""A PyTorch eager model of slm-jax's architecture (RMSNorm, RoPE, causal attention, SwiGLU, tied or separate head)
and its AdamW training step: the reference `train.bench.torch_reference` times slm-jax against. Needs torch (the
`torchref` extra); written for this bench, it follows `slm_jax.model` layer for layer so the two compute the same.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slm_jax.config import ModelConfig
from train.config import TrainConfig


def rope_tables(cfg: ModelConfig, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [seq, 1, head_dim // 2] float32: the angles of `slm_jax.layers.apply_rope` (no scaling)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq
    return torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim] rotated by half-split pairs (x[..., :d/2], x[..., d/2:]), as slm-jax does."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.attn_norm, self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), nn.RMSNorm(cfg.d_model,
                                                                                              eps=cfg.norm_eps)
        self.q, self.o = nn.Linear(cfg.d_model, width, bias=False), nn.Linear(width, cfg.d_model, bias=False)
        self.k, self.v = (nn.Linear(cfg.d_model, kv_width, bias=False) for _ in range(2))
        self.gate, self.up = (nn.Linear(cfg.d_model, cfg.hidden, bias=False) for _ in range(2))
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg, (batch, seq, _) = self.cfg, x.shape
        h = self.attn_norm(x)
        q = rotate(self.q(h).view(batch, seq, cfg.n_heads, cfg.head_dim), cos, sin)
        k = rotate(self.k(h).view(batch, seq, cfg.kv_heads, cfg.head_dim), cos, sin)
        v = self.v(h).view(batch, seq, cfg.kv_heads, cfg.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=cfg.kv_heads != cfg.n_heads)
        x = x + self.o(out.transpose(1, 2).reshape(batch, seq, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TorchTransformer(nn.Module):
    """tokens [batch, seq] int64 -> logits [batch, seq, vocab] float32, the computation of `slm_jax.model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for param in self.parameters():
            if param.ndim == 2:
                nn.init.normal_(param, std=0.02)
        cos, sin = rope_tables(cfg, cfg.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:seq], self.sin[:seq])
        x = self.final_norm(x)
        logits = x @ self.embed.weight.T if self.lm_head is None else self.lm_head(x)
        return logits.float()

    def load_jax_params(self, params) -> None:
        """Copy slm-jax float params (the `params` tree of `slm_jax.model.Transformer`) into this model: Linear
        kernels [in, out] become torch weights [out, in]; embedding table and norm scales as they are."""
        tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
        with torch.no_grad():
            self.embed.weight.copy_(tensor(params["embed"]["embedding"]))
            self.final_norm.weight.copy_(tensor(params["final_norm"]["scale"]))
            if self.lm_head is not None:
                self.lm_head.weight.copy_(tensor(params["lm_head"]["kernel"]).T)
            for i, layer in enumerate(self.layers):
                p = params[f"layer_{i}"]
                layer.attn_norm.weight.copy_(tensor(p["attn_norm"]["scale"]))
                layer.mlp_norm.weight.copy_(tensor(p["mlp_norm"]["scale"]))
                for name in ("q", "k", "v", "o"):
                    getattr(layer, name).weight.copy_(tensor(p["attn"][name]["kernel"]).T)
                for name in ("gate", "up", "down"):
                    getattr(layer, name).weight.copy_(tensor(p["mlp"][name]["kernel"]).T)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as `train.optim` configures it: weight decay on matrices only, the peak learning rate (the schedule's
    arithmetic costs nothing next to a step, so it is left out)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def train_step(model: TorchTransformer, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, grad_clip: float, bf16: bool) -> float:
    """One step: forward (bf16 autocast when `bf16`, float32 master weights), mean token cross-entropy, backward,
    global-norm clipping, AdamW. inputs, targets: [batch, seq] int64. Returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()
