"""A full disk during a checkpoint save: one line naming the path and the space needed, exit 2, earlier
checkpoints intact. The disk fills through a fake in Orbax's array writer (the real one is TensorStore)."""
import errno
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from checkpoints.disk_full import DiskFullLogFilter, is_disk_full
from checkpoints.manager import CheckpointStore, build_metadata
from slm_jax.errors import UserError
from train import main as train_main
from train.build import abstract_state, build_model
from train.config import load_config
from train.files import replace_file

# The error TensorStore raised in Orbax's writer thread when a 2 MiB tmpfs filled up (orbax 0.12.8).
TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/mnt/checkpoints/4.'
                      'orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/mnt/d/87d5":'
                      " Failed to write 233942 bytes to file 4: No space left on device [os_error_code='28']")


def fill_the_disk(monkeypatch, after_arrays: int = 0) -> None:
    """Array writes fail as on a full disk, after the first `after_arrays` have been written."""
    written, write = [], serialization.async_serialize_from_host

    async def no_space(*args, **kwargs):
        if len(written) >= after_arrays:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints/ocdbt.process_0/d/0")
        written.append(1)
        return await write(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)


@pytest.mark.parametrize("err, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (ValueError(TENSORSTORE_ENOSPC), True),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (ValueError("RESOURCE_EXHAUSTED: out of memory"), False),
])
def test_disk_full_is_recognised_from_errno_or_tensorstore_text(err, full):
    assert is_disk_full(err) is full
    try:
        raise RuntimeError("a save thread failed") from err
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped) is full


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, caplog,
                                                                                async_save):
    store = CheckpointStore(tmp_path / "checkpoints", keep=3, async_save=async_save)
    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}
    store.save(1, state, build_metadata({}, 1, state, {}))
    store.wait()
    fill_the_disk(monkeypatch)
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as raised:
        store.save(2, state, build_metadata({}, 2, state, {}))
        store.close()  # an asynchronous save fails in the background and is reported here
    store.close()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while saving checkpoint 2 to {tmp_path / 'checkpoints'}: ")
    assert "a checkpoint needs about 0.0 MiB" in message and "checkpoint 1 is intact" in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "Orbax's tracebacks were logged"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # the partial step 2 is gone
    reader = CheckpointStore(tmp_path / "checkpoints", create=False)
    restored = reader.restore({"w": np.zeros((64, 64), np.float32)}, 1)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    reader.close()


def test_other_log_records_still_pass_the_disk_full_filter():
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "Permission denied: %s", ("/x",), None)
    assert DiskFullLogFilter().filter(record)
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "failed: %s", (TENSORSTORE_ENOSPC,), None)
    assert not DiskFullLogFilter().filter(record)


def test_train_main_on_a_full_disk_exits_2_with_one_line(tmp_path, monkeypatch, capsys, corpus_file):
    workdir = tmp_path / "run"
    config = load_config("tiny")
    state_arrays = len(jax.tree_util.tree_leaves(abstract_state(config, build_model(config))))
    fill_the_disk(monkeypatch, after_arrays=state_arrays)  # room for one checkpoint
    with pytest.raises(SystemExit) as exited:
        train_main.main(["--config", "tiny", "--workdir", str(workdir), "--set", f"data.path={corpus_file}",
                         "--set", "train.steps=4", "--set", "checkpoint.every=2", "--set", "train.sample_tokens=0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: disk full while saving checkpoint 4 to {workdir}")
    assert "checkpoint 2 is intact" in err[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert CheckpointStore(workdir / "checkpoints", create=False).metadata()["step"] == 2


def test_a_file_replaced_when_the_disk_fills_keeps_its_old_bytes_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    replace_file(path, "old\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the bytes never reach the disk
    with pytest.raises(OSError, match="No space left"):
        replace_file(path, b"new, longer contents\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    replace_file(path, "new\n")
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == [path.name]
