"""One XLA device per CPU core, so a single-process CPU run trains data-parallel across its cores.

XLA CPU runs a step's ops one after another, each spread over the intra-op threads; a small model's many small ops
leave those threads idle much of the time (each of 2 cores about 60% busy at nanoGPT's size). Split into one
device per core, the mesh's `data` axis gives each core its own rows and the cores only meet in the gradient
all-reduce: on this project's 2-core machine a step took 0.72x the time at nanoGPT's size and 0.87-0.91x at
`baseline`'s, with the same losses (docs/results/cpu-2core/training-speed.md). The devices' per-step
synchronisation costs about a millisecond, so a model much smaller than that stays on one device.
"""
from __future__ import annotations

import os

import jax

from slm_jax.config import ModelConfig
from train.sharding import MeshConfig

# Auto never splits a host into more devices than this (measured on 2 cores only; every device adds compile time)
MAX_AUTO_DEVICES = 8
FORCE_FLAG = "--xla_force_host_platform_device_count"
# Auto keeps one device for a training step under this many model FLOPs (`step_flops`): the split adds about 1.1-1.4
# ms of synchronisation per step. 2 cores, fp32, interleaved (ms per step, one device -> two): 0.008 GFLOP (width 32)
# 0.73 -> 1.84; 0.05 (`tiny`) 2.00 -> 3.38; 0.38 (width 64) 6.36 -> 5.96; 1.3 (width 128, 2 layers) 11.6 -> 11.7;
# 3.9 (nanoGPT's size, separate runs) 42.0 -> 31.2; `baseline` is 10.3.
MIN_SPLIT_FLOPS = 2e9


def with_device_count(flags: str, devices: int | None) -> str:
    """XLA_FLAGS text `flags` with its --xla_force_host_platform_device_count replaced by `devices` (removed when
    None); every other flag is kept in order."""
    kept = [f for f in flags.split() if not f.startswith(FORCE_FLAG)]
    return " ".join(kept if devices is None else [*kept, f"{FORCE_FLAG}={devices}"])


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def step_flops(model: ModelConfig, tokens: int) -> float:
    """Model FLOPs of a training step over `tokens` tokens: 6 x tokens x the matmul weights (q, k, v, o, gate, up,
    down per layer, and the LM head), forward and backward; attention scores are left out."""
    return 6.0 * tokens * (model.n_layers * model.layer_matmul_params + model.vocab_size * model.d_model)


def gains_from_split(flops: float | None) -> bool:
    """Whether a training step of `flops` model FLOPs (`step_flops`; None: not known) is large enough for auto to
    split the host (at least MIN_SPLIT_FLOPS)."""
    return flops is None or flops >= MIN_SPLIT_FLOPS


def cpu_device_count(mesh: MeshConfig, batch_size: int, cores: int, flops: float | None = None) -> int:
    """How many CPU devices a run with this `mesh` section and `batch_size` (rows per micro-batch) splits a host of
    `cores` cores into: `mesh.cpu_devices` when set; else the devices an explicit mesh needs (mesh.data set: data x
    fsdp x tensor); else the most devices up to min(cores, MAX_AUTO_DEVICES) that fsdp x tensor divide and that
    split the batch evenly (the batch is split over data x fsdp = devices / tensor); at least fsdp x tensor. A
    step of `flops` (`step_flops`; None: not known) under MIN_SPLIT_FLOPS keeps the fewest devices the mesh allows."""
    if mesh.cpu_devices:
        return mesh.cpu_devices
    split = mesh.fsdp * mesh.tensor
    if mesh.data != -1:
        return mesh.data * split
    if not gains_from_split(flops):
        return split
    for count in range(min(cores, MAX_AUTO_DEVICES), 0, -1):
        if count % split == 0 and batch_size % (count // mesh.tensor) == 0:
            return count
    return split


def split_cpu_host(mesh: MeshConfig, batch_size: int, env=None, flops: float | None = None) -> int | None:
    """Give JAX's CPU backend `cpu_device_count(...)` devices (jax_num_cpu_devices) for this process. Call it
    before any JAX computation, in a process that is not part of a multi-process run (each of those gets its
    devices from its launcher). Returns the count set, or None when the environment already chose one (XLA_FLAGS
    with --xla_force_host_platform_device_count, or JAX_NUM_CPU_DEVICES: the user's choice wins) or JAX's backend
    is already running (an in-process caller that used JAX keeps the devices it has). Only the CPU backend reads
    it: on a GPU or TPU host the accelerators train as before."""
    env = os.environ if env is None else env
    if FORCE_FLAG in env.get("XLA_FLAGS", "") or env.get("JAX_NUM_CPU_DEVICES"):
        return None
    count = cpu_device_count(mesh, batch_size, usable_cores(), flops)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # raised only when the backend is up with another count
        return None
    return count
