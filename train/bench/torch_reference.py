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

from train.bench.common import fixed_batch, placed_step, timed_steps
from train.bench.trust import spread
from train.build import build_model, state_initializer
from train.config import load_config

# torch is optional (the torchref extra): both stay None without it, and the section skips
torch = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
torch_model = importlib.import_module("train.bench.torch_model") if torch else None

PRECISIONS = {"fp32": False, "bf16": True}  # precision -> torch bf16 autocast


def skipped() -> dict:
    return {"skipped": "torch is not installed (pip install -e '.[torchref]'); no PyTorch reference measured",
            "rows": [], "spreads": {}}


def build_pair(overrides, precision: str) -> dict:
    """One size and precision: slm-jax's step as `train.main` runs it (`placed_step`: data-parallel over a CPU split
    one device per core) and, where that is more than one device, on one device too; and the torch model and
    optimizer. Every model starts from the same parameters and reads the same batch."""
    config = load_config("baseline", [*overrides, f"train.precision={precision}"])
    model = build_model(config)
    init = jax.jit(state_initializer(config, model))
    reference = torch_model.TorchTransformer(config.model)
    reference.load_jax_params(jax.device_get(init().params))
    batch = fixed_batch(config)
    steps = {"jax": placed_step(config, model, init(), batch)}
    if steps["jax"][3] > 1:
        steps["jax_1dev"] = placed_step(load_config("baseline", [*overrides, f"train.precision={precision}",
                                                                 "mesh.cpu_devices=1"]), model, init(), batch)
    torch_batch = tuple(torch.from_numpy(np.asarray(x[0], np.int64)) for x in batch)  # grad_accum 1
    bf16 = PRECISIONS[precision]
    return {"precision": precision, "config": config, "devices": steps["jax"][3],
            "jax": {name: {"step": step, "state": state, "batch": placed} for name, (step, state, placed, _) in
                    steps.items()},
            "torch": (reference, torch_model.make_optimizer(reference, config.train), *torch_batch,
                      config.train.grad_clip, bf16),
            "times": {name: [] for name in (*steps, "torch")}}


def measure_reference(overrides, precisions, warmup: int, rounds: int, steps: int, say) -> dict:
    """ms per training step of slm-jax and of the PyTorch reference at `overrides` (on the baseline config) for
    each precision, timed in turn: each round runs `steps` slm-jax steps (as train.main runs them, then on one
    device when that was more) then `steps` torch steps per precision. One row per precision with min/median/max of
    each and the ratios of medians (slm-jax / torch)."""
    if torch is None:
        say(skipped()["skipped"])
        return skipped()
    rows, spreads, pairs = [], {}, []
    for precision in precisions:
        pair = build_pair(overrides, precision)
        for _ in range(1 + warmup):
            for run in pair["jax"].values():
                run["state"], _ = run["step"](run["state"], run["batch"])
            torch_model.train_step(*pair["torch"])
        jax.block_until_ready([run["state"] for run in pair["jax"].values()])
        pairs.append(pair)
    for _ in range(rounds):
        for pair in pairs:
            for name, run in pair["jax"].items():
                run["state"], seconds = timed_steps(run["step"], run["state"], run["batch"], steps)
                pair["times"][name] += seconds
            for _ in range(steps):
                tic = time.perf_counter()
                torch_model.train_step(*pair["torch"])
                pair["times"]["torch"].append(time.perf_counter() - tic)
    for pair in pairs:
        times, config = pair["times"], pair["config"]
        row = {"precision": pair["precision"], "batch_size": config.train.batch_size, "seq_len": config.model.seq_len,
               "devices": pair["devices"]}
        for name, seconds in times.items():
            row.update({f"{name}_ms": 1000 * statistics.median(seconds), f"{name}_ms_min": 1000 * min(seconds),
                        f"{name}_ms_max": 1000 * max(seconds)})
            spreads[f"{pair['precision']} {name} step"] = spread(seconds)
        row["ratio"] = row["jax_ms"] / row["torch_ms"]
        if "jax_1dev_ms" in row:
            row["ratio_1dev"] = row["jax_1dev_ms"] / row["torch_ms"]
        one = f", on 1 device {row['jax_1dev_ms']:.1f} (ratio {row['ratio_1dev']:.2f})" if "ratio_1dev" in row else ""
        say(f"{row['precision']}: slm-jax {row['jax_ms']:.1f} ms/step ({row['jax_ms_min']:.1f}..{row['jax_ms_max']:.1f}"
            f") on {row['devices']} device(s), torch {row['torch_ms']:.1f} ({row['torch_ms_min']:.1f}.."
            f"{row['torch_ms_max']:.1f}), ratio {row['ratio']:.2f}{one}")
        rows.append(row)
    return {"how": f"median of {rounds} x {steps} timed steps each, slm-jax and torch in turn every round, after "
                   f"{warmup} untimed step(s); fixed random batch; same initial parameters; slm-jax as train.main "
                   f"runs it (on a CPU, data-parallel over one device per core) and on one device; ratio = slm-jax "
                   f"median / torch median (below 1: slm-jax is faster)",
            "overrides": list(overrides), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "rows": rows, "spreads": spreads}
