"""Checkpoint integrity for states no process holds whole (multi-process runs): a save records a CRC-32 per shard,
keyed by its block of the array, and a restore compares every recorded block it holds, whatever its layout. The
sharded saves here come from a child process of 2 CPU devices (the test session has one), the per-shard path forced
as where arrays are not fully addressable; tests/test_multiprocess.py has a real 2-process case."""
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import inspect as inspect_cli
from checkpoints.checksums import allgather_json, key_region, region_key, region_mismatches, region_of, shard_crc32s
from checkpoints.manager import CHECKSUM_KEY, SHARD_CHECKSUM_KEY, CheckpointStore
from slm_jax.errors import UserError
from train.cpu_devices import with_device_count

ROOT = Path(__file__).resolve().parents[1]


def reference_crc(value: np.ndarray, key: str) -> int:
    """Independent reference: zlib over numpy's bytes of the block `key` names ("0:4,0:16")."""
    block = value[tuple(slice(*map(int, part.split(":"))) for part in key.split(",") if part)]
    return zlib.crc32(np.ascontiguousarray(block).tobytes())


def test_region_keys_name_each_block_and_reject_what_is_not_one():
    assert region_key(region_of((slice(0, 4, None), slice(None, None, None)), (8, 16))) == "0:4,0:16"
    assert region_key(region_of((slice(None, None, None),), (6,))) == "0:6"
    assert region_key(region_of((), ())) == "" and key_region("", ()) == ()
    assert key_region("4:8,0:16", (8, 16)) == (slice(4, 8), slice(0, 16))
    for key in ("0:9,0:16", "4:2,0:16", "0:4", "0:4,0:16,0:1", "a:b,0:16", "0-4,0:16", "-1:4,0:16", ""):
        assert key_region(key, (8, 16)) is None, key


def test_the_crc32_of_a_whole_array_s_one_shard_is_zlib_of_its_bytes():
    rng = np.random.default_rng(0)
    for value in (rng.normal(size=(8, 16)).astype(np.float32), rng.integers(-8, 8, (3, 5)).astype(jnp.int4),
                  rng.normal(size=(1, 16)).astype(jnp.bfloat16), np.int32(7)):
        key = ",".join(f"0:{n}" for n in np.shape(value))
        assert shard_crc32s(jnp.asarray(value)) == {key: zlib.crc32(np.asarray(value).tobytes())}


def test_recorded_blocks_are_sliced_from_a_whole_array_and_a_changed_one_is_named():
    value = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    blocks = ("0:4,0:8", "0:4,8:16", "4:8,0:8", "4:8,8:16")
    recorded = {key: reference_crc(value, key) for key in blocks}
    assert region_mismatches(jnp.asarray(value), recorded) == []
    changed = value.copy()
    changed[5, 9] += 1
    assert region_mismatches(jnp.asarray(changed), recorded) == ["4:8,8:16"]
    assert region_mismatches(jnp.asarray(changed), {"0:8": 0, "0:9,0:16": 0}) == []  # blocks of no array this shape


def test_allgather_in_one_process_is_the_value_alone():
    assert allgather_json({"a": [1]}) == [{"a": [1]}]


SAVE_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from checkpoints import manager
    from checkpoints.manager import CheckpointStore
    from slm_jax.errors import UserError
    from tests.disk_damage import rewrite_on_disk

    mesh = Mesh(np.array(jax.devices()), ("x",))
    def state(seed):
        rng = np.random.default_rng(seed)
        values = {"params": {"w": rng.normal(size=(8, 16)).astype(np.float32),
                             "scale": rng.normal(size=(2, 16)).astype(jnp.bfloat16),
                             "codes4": rng.integers(-8, 8, (8, 16)).astype(jnp.int4)},
                  "step": np.int32(seed)}
        specs = {"params": {"w": P("x", None), "scale": P(None, "x"), "codes4": P()}, "step": P()}
        return values, jax.tree_util.tree_map(lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), values, specs)
    manager.array_checksums = lambda tree: None  # as where the arrays are not fully addressable: per shard
    store = CheckpointStore(sys.argv[1], keep=5, async_save=False)
    for step in (1, 2):
        store.save(step, state(step)[1], {"format_version": 2, "step": step})
    store.wait()
    rewrite_on_disk(store.directory / "1", "params/w")
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                      state(1)[1])
    try:
        store.restore(abstract, 1)
        refused = None
    except UserError as err:
        refused = str(err)
    restored = store.restore(abstract, 2)
    equal = all(np.array_equal(np.asarray(a).astype(np.float32), b.astype(np.float32)) for a, b in
                zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state(2)[0])))
    layouts = {path: [repr(s.index) for s in leaf.addressable_shards] for path, leaf in manager.named_leaves(restored)}
    print(json.dumps({"refused": refused, "equal": equal, "layouts": layouts}))
""")


@pytest.fixture(scope="module")
def sharded_saves(tmp_path_factory):
    """Steps 1 and 2 of a state sharded over 2 CPU devices (float32 rows split, bfloat16 columns split, int4 and a
    scalar replicated), saved with shard checksums by a child process; step 1's params/w then changed on disk.
    -> (checkpoints folder, what the child found restoring into the saved layout)."""
    folder = tmp_path_factory.mktemp("sharded") / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), 2)}
    result = subprocess.run([sys.executable, "-c", SAVE_SHARDED, str(folder)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


def whole_values(seed: int) -> dict:
    rng = np.random.default_rng(seed)  # as the child's state(seed)
    return {"params/w": rng.normal(size=(8, 16)).astype(np.float32),
            "params/scale": rng.normal(size=(2, 16)).astype(jnp.bfloat16),
            "params/codes4": rng.integers(-8, 8, (8, 16)).astype(jnp.int4), "step": np.int32(seed)}


def abstract_whole() -> dict:
    return {"params": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32),
                       "scale": jax.ShapeDtypeStruct((2, 16), jnp.bfloat16),
                       "codes4": jax.ShapeDtypeStruct((8, 16), jnp.int4)}, "step": jax.ShapeDtypeStruct((), jnp.int32)}


def test_a_sharded_save_records_each_shard_s_crc32_once(sharded_saves):
    folder, _ = sharded_saves
    metadata = CheckpointStore(folder, create=False).metadata(2)
    assert CHECKSUM_KEY not in metadata
    recorded = metadata[SHARD_CHECKSUM_KEY]
    assert {path: sorted(crcs) for path, crcs in recorded.items()} == {
        "params/w": ["0:4,0:16", "4:8,0:16"], "params/scale": ["0:2,0:8", "0:2,8:16"],
        "params/codes4": ["0:8,0:16"], "step": [""]}  # replicated arrays: one block, from replica 0
    for path, value in whole_values(2).items():
        assert recorded[path] == {key: reference_crc(value, key) for key in recorded[path]}, path


def test_a_sharded_restore_in_the_saved_layout_refuses_changed_bytes_in_one_line(sharded_saves):
    _, child = sharded_saves
    assert child["equal"]  # the intact step restored bit-exact, checked shard by shard
    assert child["layouts"]["params/w"] != child["layouts"]["params/codes4"]
    message = child["refused"]
    assert message and "\n" not in message
    assert message.endswith("/checkpoints/1 is damaged: the bytes of params/w differ from the CRC-32 recorded when it "
                            "was saved; other steps here: [2] (move this step's folder away to resume from, or read, "
                            "the latest of them)")


def test_one_device_restoring_a_sharded_save_checks_every_shard_sliced_from_whole_arrays(sharded_saves):
    folder, _ = sharded_saves
    store = CheckpointStore(folder, create=False)
    restored = store.restore(abstract_whole(), 2)
    assert np.array_equal(np.asarray(restored["params"]["w"]), whole_values(2)["params/w"])
    with pytest.raises(UserError, match=r"^checkpoint \S+/1 is damaged: the bytes of params/w differ from the CRC-32 "
                                        r"recorded when it was saved; other steps here: \[2\]"):
        store.restore(abstract_whole(), 1)


def test_inspect_verify_checks_a_sharded_save_s_shards(sharded_saves, capsys):
    folder, _ = sharded_saves
    inspect_cli.main([str(folder), "--step", "2", "--verify"])
    assert ("verified    every array read; 4 match the CRC-32s recorded at save for their 6 shards (saved by several "
            "processes)") in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        inspect_cli.main([str(folder), "--step", "1", "--verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "/1 is damaged: the bytes of params/w differ" in err[0], err
