"""Bench section: slm-jax's training step against a PyTorch eager model of the same architecture and size
(`train.bench.torch_model`), timed in turn round after round in one process, so the ratio holds on a shared machine.
torch is optional (the `torchref` extra): without it the section says so and measures nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import time

import jax
import numpy as np

from train.bench.common import fixed_batch, timed_steps
from train.bench.trust import spread
from train.build import build_model, state_initializer
from train.config import load_config
from train.optim import make_optimizer
from train.steps import make_train_step, steps_compiler_options

# torch is optional (the torchref extra): both stay None without it, and the section skips
torch = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
torch_model = importlib.import_module("train.bench.torch_model") if torch else None

PRECISIONS = {"fp32": False, "bf16": True}  # precision -> torch bf16 autocast


def skipped() -> dict:
    return {"skipped": "torch is not installed (pip install -e '.[torchref]'); no PyTorch reference measured",
            "rows": [], "spreads": {}}


def build_pair(overrides, precision: str):
    """(jitted slm-jax step, its state, its batch, torch model, torch optimizer, torch batch, config) of one size
    and precision, both models starting from the same parameters and reading the same batch."""
    config = load_config("baseline", [*overrides, f"train.precision={precision}"])
    model = build_model(config)
    state = jax.jit(state_initializer(config, model))()
    step = jax.jit(make_train_step(model, make_optimizer(config.train)), donate_argnums=0,
                   compiler_options=steps_compiler_options(config.quant))
    batch = fixed_batch(config)
    reference = torch_model.TorchTransformer(config.model)
    reference.load_jax_params(jax.device_get(state.params))
    optimizer = torch_model.make_optimizer(reference, config.train)
    torch_batch = tuple(torch.from_numpy(np.asarray(x[0], np.int64)) for x in batch)  # grad_accum 1
    return step, state, batch, reference, optimizer, torch_batch, config


def measure_reference(overrides, precisions, warmup: int, rounds: int, steps: int, say) -> dict:
    """ms per training step of slm-jax and of the PyTorch reference at `overrides` (on the baseline config) for
    each precision, timed in turn: each round runs `steps` slm-jax steps then `steps` torch steps per precision.
    One row per precision with min/median/max of both and the ratio of medians (slm-jax / torch)."""
    if torch is None:
        say(skipped()["skipped"])
        return skipped()
    rows, spreads, pairs = [], {}, []
    for precision in precisions:
        step, state, batch, reference, optimizer, torch_batch, config = build_pair(overrides, precision)
        bf16 = PRECISIONS[precision]
        for _ in range(1 + warmup):
            state, metrics = step(state, batch)
            torch_model.train_step(reference, optimizer, *torch_batch, config.train.grad_clip, bf16)
        jax.block_until_ready(state)
        pairs.append({"precision": precision, "state": state, "step": step, "batch": batch, "config": config,
                      "torch": (reference, optimizer, *torch_batch, config.train.grad_clip, bf16),
                      "jax_s": [], "torch_s": []})
    for _ in range(rounds):
        for pair in pairs:
            pair["state"], seconds = timed_steps(pair["step"], pair["state"], pair["batch"], steps)
            pair["jax_s"] += seconds
            for _ in range(steps):
                tic = time.perf_counter()
                torch_model.train_step(*pair["torch"])
                pair["torch_s"].append(time.perf_counter() - tic)
    for pair in pairs:
        jax_s, torch_s, config = pair["jax_s"], pair["torch_s"], pair["config"]
        row = {"precision": pair["precision"], "batch_size": config.train.batch_size, "seq_len": config.model.seq_len,
               "ratio": statistics.median(jax_s) / statistics.median(torch_s)}
        for name, times in (("jax", jax_s), ("torch", torch_s)):
            row.update({f"{name}_ms": 1000 * statistics.median(times), f"{name}_ms_min": 1000 * min(times),
                        f"{name}_ms_max": 1000 * max(times)})
            spreads[f"{pair['precision']} {name} step"] = spread(times)
        say(f"{row['precision']}: slm-jax {row['jax_ms']:.1f} ms/step ({row['jax_ms_min']:.1f}..{row['jax_ms_max']:.1f})"
            f", torch {row['torch_ms']:.1f} ({row['torch_ms_min']:.1f}..{row['torch_ms_max']:.1f}), "
            f"ratio {row['ratio']:.2f}")
        rows.append(row)
    return {"how": f"median of {rounds} x {steps} timed steps each, slm-jax and torch in turn every round, after "
                   f"{warmup} untimed step(s); fixed random batch; same initial parameters; ratio = slm-jax median / "
                   f"torch median (below 1: slm-jax is faster)",
            "overrides": list(overrides), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "rows": rows, "spreads": spreads}
