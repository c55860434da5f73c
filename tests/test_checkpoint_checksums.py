"""Checkpoint integrity: each save records a CRC-32 of every array's bytes, and a restore refuses arrays whose bytes
changed on disk afterwards (bit rot, a bad copy), where Orbax itself reads them without complaint."""
import json
import shutil
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from checkpoints.manager import (CHECKSUM_KEY, METADATA_CHECKSUM_KEY, CheckpointStore, array_checksums,
                                 with_metadata_checksum)
from slm_jax.errors import UserError


def state(seed: int) -> dict:
    """Arrays of every dtype a run saves: float32 weights and moments, bfloat16 scales, int8 and int4 codes, a step."""
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                       "scale": jnp.asarray(rng.normal(size=(1, 16)), jnp.bfloat16),
                       "codes": jnp.asarray(rng.integers(-128, 128, (8, 16)), jnp.int8),
                       "codes4": jnp.asarray(rng.integers(-8, 8, (8, 16)), jnp.int4)},
            "step": jnp.asarray(seed, jnp.int32)}


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def saved_store(tmp_path, steps=(1, 2)) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints", keep=5, async_save=False)
    for step in steps:
        store.save(step, state(step), {"format_version": 2, "step": step})
    store.wait()
    return store


def test_a_save_records_the_crc32_of_each_array_s_bytes(tmp_path):
    store = saved_store(tmp_path, steps=(1,))
    recorded = store.metadata(1)[CHECKSUM_KEY]
    expected = state(1)
    assert set(recorded) == {"params/w", "params/scale", "params/codes", "params/codes4", "step"}
    # independent reference: zlib over numpy's bytes of the same values
    assert recorded["params/w"] == zlib.crc32(np.asarray(expected["params"]["w"]).tobytes())
    assert recorded["params/scale"] == zlib.crc32(np.asarray(expected["params"]["scale"]).astype(
        ml_dtypes.bfloat16).tobytes())
    assert recorded["step"] == zlib.crc32(np.int32(1).tobytes())


def test_an_intact_checkpoint_restores_bit_exact_with_every_dtype(tmp_path):
    store = saved_store(tmp_path)
    restored = store.restore(abstract(state(2)), 2)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state(2))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), np.asarray(want).astype(np.float32))
    assert array_checksums(restored) == store.metadata(2)[CHECKSUM_KEY]


def test_bytes_changed_on_disk_after_the_save_are_refused_in_one_line(tmp_path):
    store = saved_store(tmp_path)
    before = store.restore(abstract(state(1)), 1)  # readable as saved
    # a bad copy: step 1's array files replaced by step 2's (valid files, so Orbax reads them without complaint)
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
    shutil.copytree(tmp_path / "checkpoints" / "2" / "state", tmp_path / "checkpoints" / "1" / "state")
    reopened = CheckpointStore(tmp_path / "checkpoints", create=False)
    with pytest.raises(UserError) as err:
        reopened.restore(abstract(state(1)), 1)
    message = str(err.value)
    assert "checkpoints/1 is damaged: the bytes of params/" in message
    assert "(and 4 more)" in message and "differ from the CRC-32 recorded when it was saved" in message
    assert "other steps here: [2]" in message and "\n" not in message
    assert reopened.restore(abstract(state(2)), 2)["step"] == 2  # the other step is untouched
    assert int(before["step"]) == 1


def metadata_file(tmp_path, step: int):
    return tmp_path / "checkpoints" / str(step) / "metadata" / "metadata"


def test_one_changed_array_is_named(tmp_path):
    store = saved_store(tmp_path, steps=(1,))
    metadata = json.loads(metadata_file(tmp_path, 1).read_text())
    metadata[CHECKSUM_KEY]["params/codes4"] ^= 1  # as if those bytes had changed, the metadata itself intact
    metadata_file(tmp_path, 1).write_text(json.dumps(with_metadata_checksum(metadata)))
    assert store.metadata(1)[CHECKSUM_KEY]["params/codes4"] == metadata[CHECKSUM_KEY]["params/codes4"]
    with pytest.raises(UserError, match=r"the bytes of params/codes4 differ .*; no other step is kept here"):
        CheckpointStore(tmp_path / "checkpoints", create=False).restore(abstract(state(1)), 1)


def test_a_save_records_the_crc32_of_its_metadata_array_checksums_included(tmp_path):
    saved_store(tmp_path, steps=(1,))
    raw = json.loads(metadata_file(tmp_path, 1).read_text())
    body = {key: value for key, value in raw.items() if key != METADATA_CHECKSUM_KEY}
    assert set(body) == {"format_version", "step", CHECKSUM_KEY}
    # independent reference: zlib over the JSON as read back from the file, keys sorted, without spaces
    assert raw[METADATA_CHECKSUM_KEY] == zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


@pytest.mark.parametrize("edit", [lambda m: m.update(step=7), lambda m: m[CHECKSUM_KEY].update(step=1)],
                         ids=["a-value", "an-array-checksum"])
def test_metadata_edited_after_the_save_is_refused_in_one_line_naming_the_step(tmp_path, edit):
    saved_store(tmp_path)
    raw = json.loads(metadata_file(tmp_path, 2).read_text())
    edit(raw)
    metadata_file(tmp_path, 2).write_text(json.dumps(raw, indent=2))  # by hand: its CRC-32 left as saved
    refused = (r"^checkpoint \S+/checkpoints/2 is damaged: its metadata differs from the CRC-32 recorded when it was "
               r"saved \(edited by hand, or changed on disk\); other steps here: \[1\] \(move this step's folder "
               r"away to resume from, or read, the latest of them\)$")
    reopened = CheckpointStore(tmp_path / "checkpoints", create=False)
    for read in (lambda: reopened.metadata(2), lambda: reopened.restore(abstract(state(2)), 2),
                 lambda: reopened.verify(2)):
        with pytest.raises(UserError, match=refused):
            read()
    assert reopened.metadata(2, checked=False)["step"] == raw["step"]  # shown as it is when asked
    assert int(reopened.restore(abstract(state(1)), 1)["step"]) == 1  # the other step is untouched


def test_checkpoints_saved_before_checksums_still_restore(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=5, async_save=False)
    # as an older slm-jax saved: the same items, no checksums in the metadata
    store._manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state(3)),
                                                   metadata=ocp.args.JsonSave({"format_version": 2})))
    store.wait()
    assert CHECKSUM_KEY not in store.metadata(3)
    assert int(store.restore(abstract(state(3)), 3)["step"]) == 3


def test_inspect_verify_reads_every_array_and_reports_a_changed_one(tmp_path, capsys):
    from checkpoints import inspect as inspect_cli
    saved_store(tmp_path)
    inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "2", "--verify"])
    assert "verified    every array read; 5 match the CRC-32 recorded at save" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
    shutil.copytree(tmp_path / "checkpoints" / "2" / "state", tmp_path / "checkpoints" / "1" / "state")
    inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "1"])  # without --verify: metadata only, no error
    with pytest.raises(SystemExit) as exit_:
        inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "1", "--verify"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints/1 is damaged: the bytes of params/" in err[0]


def test_inspect_verify_of_a_step_saved_without_checksums_says_so(tmp_path, capsys):
    from checkpoints import inspect as inspect_cli
    store = CheckpointStore(tmp_path / "checkpoints", keep=5, async_save=False)
    store._manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state(1)),  # as an older slm-jax
                                                   metadata=ocp.args.JsonSave({"format_version": 2})))
    store.wait()
    inspect_cli.main([str(tmp_path / "checkpoints"), "--verify"])
    assert ("verified    every array read; no checksums recorded (saved before slm-jax recorded them)"
            in capsys.readouterr().out)


def test_inspect_verify_refuses_edited_metadata_and_says_when_a_step_recorded_no_crc32_of_it(tmp_path, capsys):
    from checkpoints import inspect as inspect_cli
    store = saved_store(tmp_path)
    store._manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state(3)),  # as slm-jax saved before
                                                   metadata=ocp.args.JsonSave({"format_version": 2, CHECKSUM_KEY: (
                                                       array_checksums(state(3)))})))
    store.wait()
    inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "3", "--verify"])
    assert ("verified    every array read; 5 match the CRC-32 recorded at save; the metadata is unchecked (saved "
            "before slm-jax recorded its CRC-32)") in capsys.readouterr().out
    inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "2", "--verify"])
    assert ("verified    every array read; 5 match the CRC-32 recorded at save, and the metadata matches its own"
            in capsys.readouterr().out)
    raw = json.loads(metadata_file(tmp_path, 2).read_text())
    raw["config"] = {"model": {"d_model": 48}}  # a value the save never wrote
    metadata_file(tmp_path, 2).write_text(json.dumps(raw))
    inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "2"])  # without --verify: shown as it is
    assert "model       d_model=48" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        inspect_cli.main([str(tmp_path / "checkpoints"), "--step", "2", "--verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "checkpoints/2 is damaged: its metadata differs" in err[0]


def test_checksums_are_checked_whatever_the_metadata_holds(tmp_path):
    # a store used below the run layer (sharding checks, the bench) saves metadata without slm-jax's format keys
    store = CheckpointStore(tmp_path / "checkpoints", keep=5, async_save=False)
    store.save(1, state(1), {"step": 1})
    store.save(2, state(2), {"step": 2})
    store.wait()
    assert int(store.restore(abstract(state(1)), 1)["step"]) == 1
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
    shutil.copytree(tmp_path / "checkpoints" / "2" / "state", tmp_path / "checkpoints" / "1" / "state")
    with pytest.raises(UserError, match="checkpoints/1 is damaged: the bytes of "):
        CheckpointStore(tmp_path / "checkpoints", create=False).restore(abstract(state(1)), 1)


def test_a_state_without_its_array_metadata_is_named_damage_not_another_model(tmp_path):
    store = saved_store(tmp_path)
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    damaged = (r"^checkpoint \S+/checkpoints/2 is damaged: its state lists no arrays \(state/_METADATA missing or "
               r"emptied\); other steps here: \[1\] \(move this step's folder away to resume from, or read, the "
               r"latest of them\)$")
    for read in (lambda: store.restore(abstract(state(2)), 2), lambda: store.arrays(2), lambda: store.verify(2)):
        with pytest.raises(UserError, match=damaged):
            read()
    assert store.restore(abstract(state(1)), 1)["step"] == 1  # the other step is untouched


def test_unreadable_metadata_names_the_steps_to_fall_back_on(tmp_path):
    store = saved_store(tmp_path)
    (tmp_path / "checkpoints" / "2" / "metadata" / "metadata").unlink()
    with pytest.raises(UserError, match=r"^checkpoint \S+/checkpoints/2 has no readable metadata \(.*\); other steps "
                                        r"here: \[1\] \(move this step's folder away"):
        store.metadata(2)
    assert store.metadata(1)["step"] == 1
