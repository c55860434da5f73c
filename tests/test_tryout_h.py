"""Faults of a look at the mesh and the benches: `python -m train.bench.serve_ab --size larger --rss` printed only its
header for minutes while it built and compiled its variants; it now says which variant, round and timing it is at,
with an ETA; the embedding lookup of a sharded train step no longer makes XLA all-gather its gradient's input."""
from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slm_jax.config import ModelConfig
from slm_jax.model import Transformer
from train.bench import serve_speed
from train.bench.serve_speed import interleaved_speed, timing_eta
from train.sharding import MeshConfig, make_mesh, with_logical_rules


def test_timing_eta_bounds_the_first_round_and_then_follows_the_later_rounds_pace():
    assert timing_eta(5.0, 0, 12, 4, None) == ""
    assert timing_eta(40.0, 2, 12, 4, None) == ", ETA under 3:20 (round 1 compiles)"  # 20 s each, 10 left
    assert timing_eta(80.0, 4, 12, 4, 80.0) == ", ETA 2:40"  # the first round's pace: 20 s each, 8 left
    assert timing_eta(88.0, 6, 12, 4, 80.0) == ", ETA 0:24"  # the second round's: 4 s each, 6 left


def test_serve_ab_says_what_it_builds_compiles_and_times_before_the_first_round_ends(monkeypatch):
    """serve_ab printed its header and then nothing for more than 200 s at `--size larger` (14 variants built,
    28 generates compiled for their memory analysis, then a first round that compiles again)."""
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(serve_speed.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(serve_speed, "random_served", lambda name, overrides: SimpleNamespace(variables=None))
    monkeypatch.setattr(serve_speed, "generate_memory", lambda run, b, n, kv: {"temp": 1})
    monkeypatch.setattr(serve_speed, "tree_bytes", lambda variables: {"total": 1})
    monkeypatch.setattr(serve_speed, "decode_speed", lambda run, b, n, reps, kv: {
        "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0})
    said = []
    interleaved_speed(["int8"], (), (1,), 2, 2, said.append)
    progress = [line.split(" (")[0] for line in said if not line.startswith("round ") or "timing" in line]
    assert progress[:6] == ["building float", "building float_f32", "building int8", "compiling generate for float b=1",
                            "compiling generate for float_f32 b=1", "compiling generate for int8 b=1"]
    timing = [line for line in said if "timing" in line]
    assert timing[0] == "round 1/2: timing float b=1 (1/3)"
    assert timing[1].startswith("round 1/2: timing float_f32 b=1 (2/3), ETA under ")
    assert timing[3].startswith("round 2/2: timing float b=1 (1/3), ETA ")
    assert len(timing) == 6


def test_the_embedding_lookup_reads_the_whole_table_under_the_trainers_logical_rules():
    """`python -m train.main --config tiny --set mesh.data=2 --set mesh.fsdp=4` printed XLA's "[SPMD] Involuntary full
    rematerialization" for the embedding's gradient scatter-add: its table is split along embed (fsdp), its
    cotangent along the batch, so XLA all-gathered the whole [batch, seq, embed] cotangent. The lookup now reads the
    table through a constraint to the whole table (as each matmul reads its whole FSDP kernel), active only under
    the trainer's rules (train.sharding.with_logical_rules): the same logits, and a no-op elsewhere."""
    model = Transformer(ModelConfig(vocab_size=61, seq_len=8, n_layers=1, n_heads=2, d_model=16, tie_embeddings=False))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))
    logits = lambda p, t: model.apply(p, t)[0]
    ruled = with_logical_rules(logits, make_mesh(MeshConfig(), jax.devices()[:1]))
    assert "sharding_constraint" not in str(jax.make_jaxpr(logits)(params, tokens))
    assert str(jax.make_jaxpr(ruled)(params, tokens)).count("sharding_constraint") == 1
    np.testing.assert_array_equal(jax.jit(ruled)(params, tokens), jax.jit(logits)(params, tokens))
