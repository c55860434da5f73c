"""Scale past one device: a ("data", "fsdp", "tensor") mesh, logical-axis rules, and the shardings of the TrainState
and of batches, so params and optimizer state are created, stepped and restored already spread over the devices.

The model names each param dimension ("embed", "mlp", ...); `RULES` maps those names to mesh axes. A dimension is
only split when the mesh axes divide it, so any model runs on any mesh (undivisible dims stay replicated).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from checkpoints.manager import array_bytes
from slm_jax.config import bounded
from slm_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes that split it. fsdp splits every matrix along d_model (ZeRO-3 style); tensor splits
# heads, the MLP hidden layer and the vocabulary (Megatron style); the batch is split over data and fsdp together.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("norm", ()),
)

Axes = tuple[tuple[str | None, int], ...]  # per dimension of a variable: (logical axis name, size)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` config section: how many ways each mesh axis splits the devices (the product is all of them)."""

    # data-parallel replicas; -1: all the devices that fsdp and tensor leave
    data: int = dataclasses.field(default=-1, metadata={"range": "-1 (all remaining devices) or between 1 and "
                                                                 "2147483647"})
    fsdp: int = bounded(1, 1)  # params, grads and optimizer state sharded over this many devices (the batch too)
    tensor: int = bounded(1, 1)  # tensor parallelism: heads, MLP hidden units and vocabulary split this many ways
    # CPU backend: XLA devices one process splits its host into; 0: one per core (module train.cpu_devices)
    cpu_devices: int = bounded(0, 0)

    def __post_init__(self):
        if self.data != -1 and self.data <= 0:
            raise UserError(f"mesh.data must be a positive integer or -1 (all remaining devices), got {self.data}")
        if self.cpu_devices < 0:
            raise UserError(f"mesh.cpu_devices must be 0 (one per core) or a positive integer, got {self.cpu_devices}")
        for key in ("fsdp", "tensor"):
            if getattr(self, key) <= 0:
                raise UserError(f"mesh.{key} must be a positive integer, got {getattr(self, key)}")

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `n_devices` devices, with data=-1 resolved."""
        split = self.fsdp * self.tensor
        if self.data == -1:
            if n_devices % split:
                raise UserError(f"mesh.fsdp * mesh.tensor = {split} must divide the number of devices "
                                f"({n_devices}) when mesh.data is -1")
            return n_devices // split, self.fsdp, self.tensor
        if self.data * split != n_devices:
            raise UserError(f"mesh.data * mesh.fsdp * mesh.tensor = {self.data * split} must equal the number of "
                            f"devices ({n_devices}); set mesh.data=-1 to use all remaining devices")
        return self.data, self.fsdp, self.tensor


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with axes `AXES`."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(cfg.shape(len(devices)), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# Coordination timeouts of a multi-process run, in seconds (environment variables override them). A process that
# stops sending heartbeats for HEARTBEAT_TIMEOUT_S (it died, or its host did) makes JAX end every other process with
# a "JAX distributed service detected fatal errors" message instead of leaving them blocked in a collective.
INIT_TIMEOUT_S = 120  # SLM_JAX_INIT_TIMEOUT_S: how long process 0 waits for all the others to join
HEARTBEAT_TIMEOUT_S = 60  # SLM_JAX_HEARTBEAT_TIMEOUT_S
SHUTDOWN_TIMEOUT_S = 60  # SLM_JAX_SHUTDOWN_TIMEOUT_S: how long a finished process waits for the others at exit


def coordination_timeouts(env=None) -> dict:
    """`jax.distributed.initialize` keyword arguments for its timeouts: the defaults above, or the environment's
    SLM_JAX_INIT_TIMEOUT_S, SLM_JAX_HEARTBEAT_TIMEOUT_S and SLM_JAX_SHUTDOWN_TIMEOUT_S (whole seconds, >= 1).
    Raises UserError naming the variable when one is not a positive integer."""
    env = os.environ if env is None else env
    out = {}
    for key, name, default in (("initialization_timeout", "SLM_JAX_INIT_TIMEOUT_S", INIT_TIMEOUT_S),
                               ("heartbeat_timeout_seconds", "SLM_JAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S),
                               ("shutdown_timeout_seconds", "SLM_JAX_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S)):
        text = env.get(name) or str(default)
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"{name} must be a whole number of seconds >= 1, got {text!r}")
        out[key] = int(text)
    return out


# What gloo says when a collective's peer process is gone (SIGKILLed, crashed): its socket closed or was reset.
_LOST_PEER = re.compile(r"\bGloo\b.*\b(Connection (closed|reset) by peer|Broken pipe)")


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective of a multi-process run failing because another process is gone: JAX raises it
    as a JaxRuntimeError (a ValueError from some dispatch paths) whose text is gloo's, e.g. "Gloo all-reduce failed:
    [...pair.cc:547] Connection closed by peer [127.0.0.1]:44236". Any other error, or any error in a
    single-process run, is not."""
    return (isinstance(err, (jax.errors.JaxRuntimeError, ValueError)) and jax.process_count() > 1
            and _LOST_PEER.search(str(err)) is not None)


def env_count(env, name: str, low: int) -> int | None:
    """The whole number in environment variable `name` (None when unset or empty); UserError naming the variable
    when it is not a whole number >= `low` (it was a ValueError traceback from int() or from JAX)."""
    text = (env.get(name) or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < low:  # str.isdigit takes "²", which int() does not
        raise UserError(f"{name} must be a whole number >= {low}, got {text!r}")
    return int(text)


def maybe_initialize_distributed() -> bool:
    """Join a multi-process (multi-host) run when the environment describes one; else do nothing.

    Call it first thing in a CLI, before any other JAX call. It calls `jax.distributed.initialize()`, with the
    timeouts of `coordination_timeouts()`, when
    - JAX_COORDINATOR_ADDRESS is set (host:port of process 0), with JAX_NUM_PROCESSES and JAX_PROCESS_ID (read
      here) unless JAX can detect them (`python -m train.launch` sets all three);
    - an srun step runs more than one task (SLURM_STEP_NUM_TASKS > 1), or mpirun more than one rank
      (OMPI_COMM_WORLD_SIZE > 1);
    - a multi-host TPU slice names its workers (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES with a comma);
    - SLM_JAX_DISTRIBUTED=1 asks for JAX's own cluster detection (e.g. Cloud TPU VMs, found via the metadata server).
    Returns whether this process is now part of a distributed run.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        count, index = env_count(env, "JAX_NUM_PROCESSES", 1), env_count(env, "JAX_PROCESS_ID", 0)
        if count is not None and index is not None and index >= count:
            raise UserError(f"JAX_PROCESS_ID ({index}) must be below JAX_NUM_PROCESSES ({count}): processes are "
                            f"numbered 0 to {count - 1}")
        jax.distributed.initialize(num_processes=count, process_id=index, **coordination_timeouts(env))
        return True
    many = lambda key: (env_count(env, key, 1) or 1) > 1
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if many("SLURM_STEP_NUM_TASKS") or many("OMPI_COMM_WORLD_SIZE") or "," in tpu_hosts \
            or env.get("SLM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize(**coordination_timeouts(env))
        return True
    return False


def logical_axes(model: nn.Module) -> dict[tuple[str, ...], Axes]:
    """Variable path (without its collection) -> per dimension (logical name, size), for every variable the
    model annotates. For a serving model, pass the float model of the same config: it still has every kernel, and
    the integer weights and scales that replace a kernel are then matched to its axes by shape."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {_names(path)[1:]: tuple(zip(leaf.names, leaf.value.shape))
            for path, leaf in leaves if isinstance(leaf, nn.Partitioned)}


def mesh_spec(axes: Axes, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec of a variable with these logical axes: each dimension is split over the mesh axes its rule
    names, dropping trailing ones until their sizes divide it; a mesh axis splits at most one dimension."""
    rules, used, out = dict(rules), set(), []
    for name, size in axes:
        split = tuple(a for a in rules.get(name, ()) if a not in used)
        while split and size % math.prod(mesh.shape[a] for a in split):
            split = split[:-1]
        used.update(split)
        out.append(None if not split else split[0] if len(split) == 1 else split)
    return PartitionSpec(*out)


def tree_shardings(tree: Any, axes: dict[tuple[str, ...], Axes], mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for any pytree of arrays (a TrainState, optimizer state, serving variables).

    A leaf takes the axes of the variable whose path ends its own (so adam's mu/nu mirror the params); else of
    the variable whose module its path runs through (AQT int weights/scales of a kernel), dimensions matched from
    the right by size; anything else (step, rng, counts) is replicated.
    """
    def sharding(path, leaf) -> NamedSharding:
        ref = _reference(_names(path), axes)
        shape = tuple(leaf.shape)
        dims: list[tuple[str | None, int]] = [(None, size) for size in shape]
        if ref is not None:
            for i in range(1, min(len(shape), len(ref)) + 1):
                if ref[-i][1] == shape[-i]:
                    dims[-i] = ref[-i]
        return NamedSharding(mesh, mesh_spec(tuple(dims), mesh, rules))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def state_shardings(init_fn: Callable[[], Any], model: nn.Module, mesh: Mesh, rules=RULES) -> Any:
    """Shardings of the state `init_fn` builds (e.g. `train.build.state_initializer`), from `model`'s axes."""
    return tree_shardings(jax.eval_shape(init_fn), logical_axes(model), mesh, rules)


def create_sharded_state(init_fn: Callable[[], Any], shardings: Any) -> Any:
    """Run `init_fn` with every output created in place on its devices (no full copy on any one device)."""
    return jax.jit(init_fn, out_shardings=shardings)()


def put_replicated_copy(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays, of which every process holds the same full copy (e.g. a run `train.run.load_run` read onto
    each process's first device), placed in `shardings` (a matching tree of Shardings). A sharding that spans other
    processes' devices is filled by each process for its own devices only, from its copy
    (`jax.make_array_from_callback`): `jax.device_put` would need a cross-host transfer, which CPU and GPU backends
    lack. Other shardings take `jax.device_put`."""
    def put(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree_util.tree_map(put, tree, shardings)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their sharding: an Orbax restore target that reshards on load."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_state, shardings)


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
    """[grad_accum, batch, seq] arrays split along the batch by the "batch" rule (data and fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, dict(rules)["batch"], None))


def _ways(sharding: NamedSharding, dim: int) -> int:
    """How many pieces `sharding` cuts dimension `dim` into."""
    axes = sharding.spec[dim] if dim < len(sharding.spec) else None
    return math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def check_batch_rows(rows: int, sharding: NamedSharding) -> None:
    """UserError unless the devices that split dimension 1 (the batch) of `sharding` divide `rows`."""
    ways = _ways(sharding, 1)
    if rows % ways:
        raise UserError(f"train.batch_size ({rows}) must be divisible by the devices it is split over "
                        f"(mesh data x fsdp = {ways})")


def shard_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Global numpy batch arrays -> global jax Arrays. Each process copies only the rows its own devices hold, so
    multi-host runs are correct as long as every process passes the same global batch."""
    def put(x: np.ndarray) -> jax.Array:
        check_batch_rows(x.shape[1], sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, batch)


def load_sharded(shape: tuple[int, ...], sharding: NamedSharding, load: Callable[[tuple], tuple],
                 count: int) -> tuple[jax.Array, ...]:
    """`count` global arrays of `shape`, split by `sharding`, whose pieces are read by `load` in the process that
    holds them: `load(index)` (`index`: one slice per dimension of `shape`) returns the `count` numpy blocks at
    `index`, and is called only for the blocks this process's devices hold (once per distinct block). So in a
    multi-process run each process reads only its own rows of a batch (`jax.make_array_from_callback`)."""
    blocks: dict = {}

    def block(index: tuple) -> tuple:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = load(index)
        return blocks[key]

    return tuple(jax.make_array_from_callback(shape, sharding, lambda index, i=i: block(index)[i])
                 for i in range(count))


def rows_sharding(mesh: Mesh, rows: int, rules=RULES) -> NamedSharding:
    """[batch, seq] arrays (evaluation batches) split along the batch by the "batch" rule when the mesh axes divide
    `rows`; else replicated (a last, smaller batch)."""
    spec = mesh_spec((("batch", rows), (None, 1)), mesh, rules)
    return NamedSharding(mesh, spec)


def shard_train_step(train_step: Callable, state_shardings: Any, batch_sharding: NamedSharding,
                     compiler_options: dict | None = None) -> Callable:
    """`train_step` jitted so the new state keeps the old one's shardings (and reuses its buffers), compiled with
    XLA `compiler_options` (see train.steps.steps_compiler_options)."""
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(with_logical_rules(train_step, batch_sharding.mesh), in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options)


def with_logical_rules(fn: Callable, mesh: Mesh, rules=RULES) -> Callable:
    """`fn` traced with `mesh` (abstract) as the context mesh and `rules` as flax's logical axis rules, so the model's
    own constraints on its activations (`nn.with_logical_constraint`, e.g. the embedding lookup's whole table) take
    effect; outside such a context they are no-ops."""
    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args)
    return traced


def per_device_bytes(tree: Any) -> dict:
    """Device -> bytes of `tree` it holds (this process's devices; int4 counted as half a byte, as in checkpoint
    metadata). Leaves are arrays, or ShapeDtypeStructs with a sharding (to plan memory before allocating)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            held = [(shard.device, shard.data.shape) for shard in leaf.addressable_shards]
        else:
            shard_shape = leaf.sharding.shard_shape(leaf.shape)
            held = [(device, shard_shape) for device in leaf.sharding.addressable_devices]
        for device, shape in held:
            out[device] = out.get(device, 0) + array_bytes(shape, leaf.dtype)
    return out


def _names(path) -> tuple:
    """A pytree key path as plain names (dict keys, attribute names) and indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _reference(names: tuple, axes: dict[tuple[str, ...], Axes]) -> Axes | None:
    """The axes a leaf at `names` borrows: an exact path-suffix match, else the deepest module on its path."""
    for start in range(len(names)):
        if names[start:] in axes:
            return axes[names[start:]]
    best, depth = None, 0
    for path, ref in axes.items():
        module = path[:-1]
        if len(module) > depth and any(names[i:i + len(module)] == module for i in range(len(names))):
            best, depth = ref, len(module)
    return best
