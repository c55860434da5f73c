"""Multi-device checks of train/sharding.py, run by tests/test_sharding.py in a subprocess with 8 simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts, and the rest of the
suite runs on one device). Shard shapes are asserted here; results the test compares are printed as JSON.

Usage: python tests/sharding_checks.py WORKDIR
"""
import json
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints.manager import CheckpointStore  # noqa: E402
from slm_jax.errors import UserError  # noqa: E402
from train.build import build_model, state_initializer  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import get_batch  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.sharding import (MeshConfig, abstract_with_shardings, batch_sharding, create_sharded_state,  # noqa: E402
                            make_mesh, per_device_bytes, shard_batch, shard_train_step, state_shardings)
from train.steps import make_train_step  # noqa: E402

STEPS = 5
MESHES = {"1": (1, dict(data=1)), "data2_fsdp4": (8, dict(data=2, fsdp=4)), "data8": (8, dict(data=8)),
          "data2_fsdp2_tensor2": (8, dict(data=2, fsdp=2, tensor=2))}


def mesh_of(devices: int = 8, **sizes):
    return make_mesh(MeshConfig(**sizes), jax.devices()[:devices])


def setup(config, mesh):
    model = build_model(config)
    init = state_initializer(config, model)
    return model, init, state_shardings(init, model, mesh)


def train(config, mesh, tokens, start):
    """Losses of STEPS sharded train steps from `start` (placed on `mesh`), and the final state."""
    model, _, shardings = setup(config, mesh)
    state = jax.device_put(start, shardings)
    place = batch_sharding(mesh)
    step_fn = shard_train_step(make_train_step(model, make_optimizer(config.train)), shardings, place)
    cfg, seq = config.train, config.model.seq_len
    losses = []
    for step in range(STEPS):
        x, y = get_batch(tokens, cfg.seed, step, cfg.batch_size * cfg.grad_accum, seq)
        shape = (cfg.grad_accum, cfg.batch_size, seq)
        state, metrics = step_fn(state, shard_batch((x.reshape(shape), y.reshape(shape)), place))
        losses.append(float(metrics["loss"]))
    return losses, state


def spec_table(state) -> dict[str, str]:
    """'params/layer_0/attn/q/kernel' (and mu/nu) -> str(PartitionSpec)."""
    trees = {"params": state.params, **{k: optax.tree_utils.tree_get(state.opt_state, k) for k in ("mu", "nu")}}
    return {f"{name}/" + "/".join(str(k.key) for k in path): str(leaf.sharding.spec)
            for name, tree in trees.items() for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_shard_shapes(state, n_devices: int) -> None:
    """data2_fsdp4: matrices split 4 ways along d_model; norm scales whole on every device."""
    for tree in (state.params, *(optax.tree_utils.tree_get(state.opt_state, k) for k in ("mu", "nu"))):
        layer = tree["layer_0"]
        expected = {("attn", "q", "kernel"): (8, 32), ("attn", "o", "kernel"): (32, 8),
                    ("mlp", "gate", "kernel"): (8, 96), ("mlp", "down", "kernel"): (96, 8),
                    ("attn_norm", "scale"): (32,)}
        for path, shape in expected.items():
            x = layer[path[0]][path[1]][path[2]] if len(path) == 3 else layer[path[0]][path[1]]
            assert len(x.addressable_shards) == n_devices
            for shard in x.addressable_shards:
                chex.assert_shape(shard.data, shape)
        for shard in tree["embed"]["embedding"].addressable_shards:
            chex.assert_shape(shard.data, (256, 8))


def bit_exact(a, b) -> bool:
    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return all(jax.tree_util.tree_leaves(same))


def reshard_on_load(trained: dict, workdir: Path) -> dict:
    """Save a trained state from one mesh, restore it onto others: values bit-exact, in the target's shardings."""
    config, out = trained["config"], {}
    for source, targets in (("data2_fsdp4", {"fsdp4": (4, dict(fsdp=4)), "single": (1, dict(data=1))}),
                            ("1", {"data2_fsdp2_tensor2": (8, dict(data=2, fsdp=2, tensor=2))})):
        saved = trained[source]
        store = CheckpointStore(workdir / source, async_save=False)
        store.save(STEPS, saved, {"step": STEPS})
        for name, (n_devices, sizes) in targets.items():
            mesh = mesh_of(n_devices, **sizes)
            _, init, shardings = setup(config, mesh)
            restored = store.restore(abstract_with_shardings(jax.eval_shape(init), shardings), STEPS)
            placed = jax.tree_util.tree_map(lambda x, s: x.sharding == s, restored, shardings)
            out[f"{source}->{name}"] = {"bit_exact": bit_exact(saved, restored),
                                        "in_target_shardings": all(jax.tree_util.tree_leaves(placed)),
                                        "devices": len(restored.params["lm_head"]["kernel"].sharding.device_set)}
        store.close()
    return out


def planned_bytes(config, mesh) -> dict:
    """Device -> bytes of params + optimizer state under `mesh`, from shapes and shardings alone."""
    _, init, shardings = setup(config, mesh)
    abstract = abstract_with_shardings(jax.eval_shape(init), shardings)
    return per_device_bytes((abstract.params, abstract.opt_state))


def baseline_bytes() -> dict:
    """Per-device bytes of params + optimizer state of the `baseline` config: pure data parallel vs fsdp=8."""
    config = load_config("baseline")
    out = {}
    for name, sizes in {"data8": dict(data=8), "fsdp8": dict(fsdp=8)}.items():
        held = planned_bytes(config, mesh_of(8, **sizes))
        out[name] = {"max": max(held.values()), "min": min(held.values()), "total": sum(held.values())}
    return out


def indivisible_batch_error(config) -> str:
    mesh = mesh_of(8, data=8)
    try:
        shard_batch(np.zeros((1, 6, config.model.seq_len), np.int32), batch_sharding(mesh))
    except UserError as err:
        return str(err)
    return ""


def main(workdir: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = load_config("tiny", ["model.n_layers=1", "train.grad_accum=2", "train.sample_tokens=0"])
    tokens = np.random.default_rng(0).integers(0, 256, size=4096).astype(np.uint16)
    results, timings, trained = {"losses": {}}, {}, {"config": config}
    # Every mesh starts from the same fresh state, created sharded once (compiling init once).
    _, init, shardings = setup(config, mesh_of(8, data=2, fsdp=4))
    created = create_sharded_state(init, shardings)
    placed = jax.tree_util.tree_map(lambda x, s: x.sharding == s, created, shardings)
    results["created_in_shardings"] = all(jax.tree_util.tree_leaves(placed))
    fresh = jax.device_get(created)
    for name, (n_devices, sizes) in MESHES.items():
        tic = time.perf_counter()
        start = created if name == "data2_fsdp4" else fresh
        results["losses"][name], trained[name] = train(config, mesh_of(n_devices, **sizes), tokens, start)
        timings[name] = time.perf_counter() - tic
    state = trained["data2_fsdp4"]
    check_shard_shapes(state, 8)
    results["specs"] = spec_table(state)
    held = per_device_bytes((state.params, state.opt_state))
    results["held_matches_planned"] = held == planned_bytes(config, mesh_of(8, data=2, fsdp=4))
    results["indivisible_batch_error"] = indivisible_batch_error(config)
    tic = time.perf_counter()
    results["reshard"] = reshard_on_load(trained, workdir)
    timings["reshard"] = time.perf_counter() - tic
    tic = time.perf_counter()
    results["baseline_bytes"] = baseline_bytes()
    timings["bytes"] = time.perf_counter() - tic
    results["timings"] = timings
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
