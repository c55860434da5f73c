"""A thin wrapper over Orbax's `CheckpointManager`: the train state plus a JSON metadata item per step.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoints readable (a writer deletes such leftovers when it opens); saves are asynchronous and awaited
in `close`, and a full disk is one UserError line (`checkpoints.disk_full`). Each save records a CRC-32 of every
array's bytes in its metadata (`array_crc32`), or of every shard's where no process holds the arrays whole (a
multi-process run: `shard_crc32`, `checkpoints.checksums`), and a restore compares them, so bytes changed on disk
after the save (bit rot, a bad copy) are refused as damage instead of resuming from them. The metadata records a
CRC-32 of itself too (`metadata_crc32`), checked whenever it is read, so a config edited by hand (a wrong d_model)
is refused the same way instead of building another model than the one saved. Metadata is versioned: `metadata()`
returns it in the current format whatever format it was saved in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from checkpoints.checksums import allgather_json, bytes_crc32, json_crc32, region_mismatches, shard_crc32s
from checkpoints.disk_full import disk_full_message, is_disk_full, quiet_disk_full_logs
from checkpoints.versioning import FORMAT_VERSION, upgrade
from slm_jax.errors import UserError

ITEMS = ("state", "metadata")
SUBBYTE_BITS = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2}


def project_version() -> str:
    try:
        return importlib.metadata.version("slm-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def array_bytes(shape, dtype) -> int:
    """Storage of one array; int4 counts half a byte per value."""
    dtype = np.dtype(dtype)
    bits = SUBBYTE_BITS.get(dtype.name, dtype.itemsize * 8)
    return (int(np.prod(shape, dtype=np.int64)) * bits + 7) // 8


def tree_bytes(tree) -> dict[str, int]:
    """Bytes of the arrays in a tree by dtype name (int4 counted as half a byte), plus 'total'."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        name = np.dtype(leaf.dtype).name
        out[name] = out.get(name, 0) + array_bytes(leaf.shape, leaf.dtype)
    out["total"] = sum(out.values())
    return out


def param_count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def build_metadata(config: dict, step: int, params: Any, tokenizer: dict, kind: str = "train",
                   quant_plan: dict | None = None, **extra) -> dict:
    """What every checkpoint says about itself (read back by every later command).

    `quant_plan`: the per-layer plan as JSON (`quant.plan.plan_to_json`), or None for a float run.
    """
    return {
        "format_version": FORMAT_VERSION,
        "project_version": project_version(),
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": int(step),
        "config": config,
        "quant_plan": quant_plan,
        "tokenizer": tokenizer,
        "param_count": param_count(params),
        "param_bytes": tree_bytes(params),
        **extra,
    }


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One array of a saved state, known from Orbax's metadata without reading its values."""

    path: str  # e.g. "params/layer_0/attn/q/kernel"
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return array_bytes(self.shape, self.dtype)


def key_path_str(key_path) -> str:
    """`.params['embed'][0]` (any mix of attribute, dict and sequence keys) -> "params/embed/0"."""
    names = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
    return "/".join(str(n) for n in names)


def arrays_of(tree) -> list[ArrayInfo]:
    """Path, shape and dtype of every array in a tree (real, abstract or Orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [ArrayInfo(key_path_str(p), tuple(leaf.shape), np.dtype(leaf.dtype)) for p, leaf in leaves]


def tree_difference(saved: list[ArrayInfo], expected: list[ArrayInfo]) -> str | None:
    """The first difference between two lists of arrays, in words; None when paths, shapes and dtypes agree."""
    have, want = {a.path: a for a in saved}, {a.path: a for a in expected}
    missing = [p for p in want if p not in have]
    if missing:
        return f"it has no {missing[0]}" + (f" (and {len(missing) - 1} more arrays)" if len(missing) > 1 else "")
    extra = [p for p in have if p not in want]
    if extra:
        return f"it has an unexpected {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for path, a in want.items():
        b = have[path]
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            return f"{path} is {b.dtype.name}{list(b.shape)}, the model expects {a.dtype.name}{list(a.shape)}"
    return None


def _describe(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


CHECKSUM_KEY = "array_crc32"  # metadata: {array path: zlib CRC-32 of its bytes}; absent in checkpoints before it
# metadata of a save by several processes, instead of CHECKSUM_KEY: {array path: {region key: CRC-32 of that block's
# bytes}} (`checkpoints.checksums.region_key`, e.g. "0:64,0:128"), each block one shard of the array as saved
SHARD_CHECKSUM_KEY = "shard_crc32"
# metadata: `checkpoints.checksums.json_crc32` of the rest of the metadata (the arrays' CRC-32s included), as saved;
# an optional key, absent in checkpoints saved before it (their metadata reads unchecked, as format 2 still)
METADATA_CHECKSUM_KEY = "metadata_crc32"


def with_metadata_checksum(metadata: dict) -> dict:
    """`metadata` with its CRC-32 (`json_crc32` of everything but METADATA_CHECKSUM_KEY) under that key."""
    body = {key: value for key, value in metadata.items() if key != METADATA_CHECKSUM_KEY}
    return {**body, METADATA_CHECKSUM_KEY: json_crc32(body)}


def metadata_intact(raw) -> bool:
    """False when `raw`, a step's metadata as saved, differs from the CRC-32 it recorded of itself (edited by hand or
    changed on disk since the save); True when it matches or recorded none (saved before slm-jax did, or not a JSON
    object: `upgrade` says so)."""
    if not isinstance(raw, dict) or METADATA_CHECKSUM_KEY not in raw:
        return True
    return with_metadata_checksum(raw)[METADATA_CHECKSUM_KEY] == raw[METADATA_CHECKSUM_KEY]


def step_folders(directory: Path) -> list[int]:
    """The step folders in the checkpoint folder `directory` now, as sorted numbers, read from the file system (not
    Orbax's list, which a CheckpointStore reads once, when it is opened)."""
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit() and p.is_dir())


def named_leaves(tree) -> list[tuple[str, Any]]:
    """(path, leaf) of every array of `tree`, in the tree's order."""
    return [(key_path_str(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def array_checksums(tree) -> dict[str, int] | None:
    """{path: CRC-32 (zlib) of the array's bytes in C order} for every array of `tree`, or None when an array is not
    wholly held by this process (a multi-process sharded state: no process sees all its bytes; see
    `shard_checksums`). The same on every process of a run: whether arrays are whole depends on their shardings.

    Reads the values to the host once; about 1 s per GB on this project's 2-core CPU."""
    leaves = named_leaves(tree)
    if any(not getattr(leaf, "is_fully_addressable", True) for _, leaf in leaves):
        return None
    values = jax.device_get([leaf for _, leaf in leaves])
    return {path: bytes_crc32(value) for (path, _), value in zip(leaves, values)}


def checksum_mismatches(restored, expected: dict[str, int], saved: list[ArrayInfo]) -> list[str]:
    """Paths of `restored`'s arrays whose CRC-32 differs from `expected` (the save's), among those restored as saved
    (same shape and dtype: an array restored into another dtype is not comparable byte for byte)."""
    actual = array_checksums(restored)
    if actual is None:
        return []
    kept = {a.path: (a.shape, a.dtype) for a in saved}
    restored_as = {a.path: (a.shape, a.dtype) for a in arrays_of(restored)}
    return [path for path, crc in actual.items()
            if path in expected and kept.get(path) == restored_as[path] and expected[path] != crc]


def shard_checksums(tree) -> dict[str, dict[str, int]]:
    """{path: {region key: CRC-32}} for every array of `tree`: each shard's CRC-32 (`checkpoints.checksums`), keyed by
    its block of the whole array, from whichever process owns it (replica 0). A collective: every process of a
    multi-process run calls it together, and each gets the whole result."""
    local = {path: shard_crc32s(leaf) for path, leaf in named_leaves(tree)}
    merged: dict[str, dict[str, int]] = {}
    for part in allgather_json(local):  # process order: process 0's entry wins should two record one block
        for path, crcs in part.items():
            for key, crc in crcs.items():
                merged.setdefault(path, {}).setdefault(key, crc)
    return merged


def shard_checksum_mismatches(restored, expected: dict[str, dict[str, int]], saved: list[ArrayInfo]) -> list[str]:
    """Paths of `restored`'s arrays (restored as saved: same shape and dtype) whose bytes differ from a block's CRC-32
    in `expected` (`shard_checksums` at save), found by any process. Each process compares the recorded blocks that lie
    within the shards it owns (replica 0; every block where it holds an array whole), then the processes gather their
    findings (a collective, as `shard_checksums`), so all return the same list, in the tree's order."""
    kept = {a.path: (a.shape, a.dtype) for a in saved}
    leaves = named_leaves(restored)
    local = [path for path, leaf in leaves if isinstance(expected.get(path), dict) and
             kept.get(path) == (tuple(leaf.shape), np.dtype(leaf.dtype)) and region_mismatches(leaf, expected[path])]
    anywhere = {path for part in allgather_json(local) for path in part}
    return [path for path, _ in leaves if path in anywhere]


def peek_metadata(directory: Path) -> dict | None:
    """The metadata of the latest step in the checkpoint folder `directory`, read as plain JSON without Orbax, whose
    CheckpointManager starts JAX's backend (train.main reads the shape of the model it will train before a CPU
    process sets its device count, which only an idle backend takes); migrated and CRC-checked as
    `CheckpointStore.metadata`. None when no step holds readable, intact metadata (the Orbax read later says why)."""
    try:
        steps = step_folders(directory)
    except OSError:
        return None
    if not steps:
        return None
    path = Path(directory) / str(steps[-1]) / "metadata" / "metadata"  # Orbax's JsonCheckpointHandler's file
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not metadata_intact(raw):
        return None
    try:
        return upgrade(raw, str(path))
    except UserError:
        return None


def remove_unfinished_saves(directory: Path) -> None:
    """Delete the temporary folders of saves that never finished (the process died mid-save).

    Done here, synchronously, rather than by Orbax's `cleanup_tmp_directories`, whose background thread can still
    be running when a short-lived process exits (e.g. on a config error) and then fails noisily.
    """
    for path in directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"):
        shutil.rmtree(path)


@contextlib.contextmanager
def _orbax_quiet():
    """Silence Orbax's log lines while reading: it warns about what this class reports itself in one line
    (a read-only folder, a step with missing files), and CLIs promise a single line on errors."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _stderr_captured():
    """Capture what is written to file descriptor 2 (by any thread, C++ included) while the block runs; yields a
    `.show()` to write the capture out after all, and `.size()`."""
    sys.stderr.flush()
    saved, python_stderr = os.dup(2), sys.stderr
    with tempfile.TemporaryFile("w+b") as captured:
        os.dup2(captured.fileno(), 2)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, closefd=True)  # Python's writes too, whoever replaced it

        def show() -> None:
            sys.stderr.flush()
            captured.seek(0)
            os.write(saved, captured.read())

        def size() -> int:
            return os.fstat(captured.fileno()).st_size

        try:
            yield types.SimpleNamespace(show=show, size=size)
        finally:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)


def _wait_for_failed_reads(captured_size, quiet_for: float = 1.0, limit: float = 20.0) -> None:
    """After a failed read of damaged files: Orbax raised the first failing read, and the rest end as tracebacks
    printed from TensorStore's threads and "exception ignored" notes when their coroutines are collected. Wait
    (collecting garbage) until nothing more has been printed for `quiet_for` seconds. (0.5 s let a 199-line
    traceback through once, on a 2-core machine at load 4.)"""
    size, quiet_since, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - quiet_since < quiet_for and time.monotonic() - start < limit:
        time.sleep(0.1)
        gc.collect()
        if captured_size() != size:
            size, quiet_since = captured_size(), time.monotonic()


def _read_quietly(read: Callable[[], Any], failure: Callable[[Exception], str]) -> Any:
    """read() (an Orbax read) with what Orbax and TensorStore's reader threads print kept back, so a command reports a
    failed read in one line: its result (and the kept output shown after all), or UserError(failure(err)) once the
    failed reads have finished printing."""
    with _orbax_quiet(), _stderr_captured() as captured:
        try:
            result = read()
        except Exception as err:
            message = failure(err)
        else:
            captured.show()
            return result
        _wait_for_failed_reads(captured.size)  # outside `except`, so the failed reads can be collected
    raise UserError(message)


def _with_sharding(leaf: Any) -> Any:
    """An abstract array as a restore target that names its devices (Orbax refuses to guess when the checkpoint was
    written on another topology): its own sharding, else this process's first device."""
    if getattr(leaf, "sharding", None) is not None or not hasattr(leaf, "shape"):
        return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]))


class CheckpointStore:
    """Checkpoints of one run under `directory` (usually `<workdir>/checkpoints`).

    `create=False` opens an existing folder read-only: nothing there is created, deleted or cleaned up.
    """

    def __init__(self, directory: Path, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = Path(directory).resolve()
        self.keep = keep
        self._writing: tuple[int, int] | None = None  # (step, bytes of its arrays) of the latest save started
        self._read_failed = False  # a read of damaged files failed (see close)
        if create:
            if jax.process_index() == 0:  # one process of a multi-process run cleans up; Orbax syncs them after
                remove_unfinished_saves(self.directory)
            quiet_disk_full_logs(logging.getLogger("absl"))
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   create=True)
        else:
            if not self.directory.is_dir():
                raise UserError(f"no checkpoints at {self.directory}")
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                   save_interval_steps=0)
        registry = ocp.handlers.create_default_handler_registry(state=ocp.StandardCheckpointHandler(),
                                                                metadata=ocp.JsonCheckpointHandler())
        with _orbax_quiet():
            self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Start writing `step` (in the background when async); `metadata` is stored as given, with the CRC-32 of
        each array of `state` added under CHECKSUM_KEY where this process holds every array whole, else that of each
        shard under SHARD_CHECKSUM_KEY (gathered from every process: in a multi-process run every process calls
        `save` together, as Orbax requires anyway), and then the CRC-32 of the whole under METADATA_CHECKSUM_KEY.

        Raises UserError (one line: the path, the space needed, the step still intact) when the disk is full,
        here or, for an asynchronous save, at the next `save`, `wait` or `close`; the failed step's partial
        folder is removed and earlier checkpoints stay as they were.
        """
        with self._disk_full_as_user_error():
            self._manager.wait_until_finished()  # a failure of the previous save is reported for that step
        self._writing = (step, tree_bytes(state)["total"])
        checksums = array_checksums(state)
        metadata = with_metadata_checksum({**metadata, CHECKSUM_KEY: checksums} if checksums is not None else
                                          {**metadata, SHARD_CHECKSUM_KEY: shard_checksums(state)})
        with self._disk_full_as_user_error():
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             metadata=ocp.args.JsonSave(metadata)), force=True)

    @contextlib.contextmanager
    def _disk_full_as_user_error(self):
        try:
            yield
        except Exception as err:
            if self._writing is None or not is_disk_full(err):
                raise
            remove_unfinished_saves(self.directory)
            step, nbytes = self._writing
            raise UserError(disk_full_message(self.directory, step, nbytes, self.keep, self.latest_step())) \
                from None

    def metadata(self, step: int | None = None, checked: bool = True) -> dict:
        """The metadata of `step` (default latest), migrated to the current format. UserError when it differs from
        the CRC-32 recorded when it was saved (`_check_metadata`), unless not `checked` (`checkpoints.inspect`
        shows it as it is, and refuses it only with --verify)."""
        step = self._resolve(step)
        raw = self._raw_metadata(step)
        if checked:
            self._check_metadata(step, raw)
        return upgrade(raw, self._where(step))

    def _check_metadata(self, step: int, raw: Any) -> None:
        """UserError (one line naming the step and the steps to fall back on, as for damaged arrays) when `raw`, the
        metadata of `step` as saved, differs from the CRC-32 it recorded of itself: edited by hand or changed on disk
        since the save (`metadata_intact`)."""
        if not metadata_intact(raw):
            raise UserError(f"checkpoint {self._where(step)} is damaged: its metadata differs from the CRC-32 recorded "
                            f"when it was saved (edited by hand, or changed on disk){self._fallback(step)}")

    def _raw_metadata(self, step: int) -> Any:
        """The metadata item of `step` as saved (any JSON value); UserError when it cannot be read."""
        try:
            with _orbax_quiet():
                restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax raises many types for a damaged folder
            raise UserError(f"checkpoint {self._where(step)} has no readable metadata ({_describe(err)})"
                            f"{self._fallback(step)}") from None
        return restored["metadata"]

    def arrays(self, step: int | None = None) -> list[ArrayInfo]:
        """Path, shape and dtype of every array in the state of `step`, read from Orbax's metadata only."""
        step = self._resolve(step)
        # a missing or damaged OCDBT manifest fails in TensorStore's threads, which print tracebacks meanwhile
        found = self._read_quietly(lambda: arrays_of(self._manager.item_metadata(step)["state"]), lambda err: (
            f"checkpoint {self._where(step)} has no readable array metadata ({_describe(err)}){self._fallback(step)}"))
        if not found:  # Orbax reads a state folder without its _METADATA file as an empty tree; no state is empty
            raise UserError(f"checkpoint {self._where(step)} is damaged: its state lists no arrays (state/_METADATA "
                            f"missing or emptied){self._fallback(step)}")
        return found

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restore the state at `step` (default latest) into the structure of `target` (abstract arrays). Leaves
        that carry a sharding are restored (resharded) into it; the others whole onto this process's first device,
        whatever devices or processes saved them.

        Raises UserError (one line) for another model's state, for unreadable files, for metadata that differs from
        its own CRC-32 (checked first: its array checksums, and the config the target was built from, are then not
        to be trusted), and for arrays whose bytes differ from the CRC-32 recorded when the step was saved: the whole
        arrays' (checked where this process holds the restored arrays whole) or the shards' of a multi-process save
        (checked wherever they lie within a shard restored here; every process of a multi-process restore refuses
        when one finds a difference)."""
        step = self._resolve(step)
        recorded = self._recorded_checksums(step)
        target = jax.tree_util.tree_map(_with_sharding, target)
        restored = self._read_quietly(lambda: self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))), lambda err: self._restore_failure(step, target, err))
        self._check_integrity(step, restored["state"], *recorded)
        return restored["state"]

    def verify(self, step: int | None = None) -> int | None:
        """Check the metadata of `step` (default latest) against its own CRC-32, read every array whole, as saved,
        and compare it with the CRC-32s recorded at save (the whole arrays', or every shard's of a multi-process save)
        -> how many arrays were checked, or None when the step has no checksums (saved before they were recorded).
        Raises UserError as `restore` does for changed metadata and unreadable or changed arrays."""
        step = self._resolve(step)
        with _orbax_quiet():
            saved = self._manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype), saved)
        self.restore(target, step)
        whole, shards = self._recorded_checksums(step)
        recorded = whole or shards
        return len(recorded) if recorded else None

    def _recorded_checksums(self, step: int) -> tuple[dict | None, dict | None]:
        """The CRC-32s `save` recorded for `step`, read from its metadata as saved (whatever its format): (by array
        under CHECKSUM_KEY, by shard under SHARD_CHECKSUM_KEY), None for each the metadata lacks (or holds no JSON
        object in). UserError when the metadata differs from its own CRC-32 (`_check_metadata`)."""
        raw = self._raw_metadata(step)
        self._check_metadata(step, raw)
        found = [raw.get(key) if isinstance(raw, dict) else None for key in (CHECKSUM_KEY, SHARD_CHECKSUM_KEY)]
        whole, shards = (value if isinstance(value, dict) else None for value in found)
        return whole, shards

    def _check_integrity(self, step: int, restored: Any, whole: dict | None, shards: dict | None) -> None:
        """Raise UserError when an array of `restored` (step `step`) differs from its checksums at save time, `whole`
        and `shards` (`_recorded_checksums`): whatever the metadata's format, the arrays are checked if it has their
        checksums. The same on every process of a run (they read the same metadata), which all take part in the
        shard check."""
        if whole:
            bad = checksum_mismatches(restored, whole, self.arrays(step))
        elif shards:
            bad = shard_checksum_mismatches(restored, shards, self.arrays(step))
        else:
            return
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"checkpoint {self._where(step)} is damaged: the bytes of {bad[0]}{more} differ from the "
                            f"CRC-32 recorded when it was saved{self._fallback(step)}")

    def _fallback(self, step: int) -> str:
        """How to go on without a damaged `step`, for the end of its error line."""
        others = [s for s in self.steps() if s != step]
        if not others:
            return "; no other step is kept here"
        return (f"; other steps here: {others} (move this step's folder away to resume from, or read, the latest of "
                f"them)")

    def _restore_failure(self, step: int, target: Any, err: Exception) -> str:
        """Why a restore failed, in one line: another model's state, or damaged files."""
        where = self._where(step)
        difference = tree_difference(self.arrays(step), arrays_of(target))
        if difference:
            return f"checkpoint {where} holds a different state than this model expects: {difference}"
        return (f"checkpoint {where} is damaged: its arrays cannot be read ({type(err).__name__}; truncated or "
                f"corrupted files?){self._fallback(step)}")

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise UserError(f"no checkpoints at {self.directory}")
        elif step not in self.steps():
            raise UserError(f"no checkpoint for step {step} at {self.directory} (have: {self.steps()})")
        missing = [item for item in ITEMS if not (self.directory / str(step) / item).is_dir()]
        if missing:
            raise UserError(f"checkpoint {self._where(step)} is incomplete or not an slm-jax checkpoint "
                            f"(no {' or '.join(missing)} folder in it)")
        return step

    def _where(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def wait(self) -> None:
        """Wait for a save in progress; raises UserError as `save` does when the disk was full."""
        with self._disk_full_as_user_error():
            self._manager.wait_until_finished()

    def _read_quietly(self, read: Callable[[], Any], failure: Callable[[Exception], str]) -> Any:
        """The module's _read_quietly, remembering a failure for `close`."""
        try:
            return _read_quietly(read, failure)
        except UserError:
            self._read_failed = True
            raise

    def close(self) -> None:
        """Wait for any save in progress to finish, then release Orbax's resources (UserError as `wait`). After a
        failed read, what the failed reads' threads print while Orbax closes its event loop under them ("Event loop
        is closed" tracebacks) is kept back: the read's UserError already said what happened."""
        try:
            self.wait()
        finally:
            if self._read_failed:
                with _stderr_captured() as captured:
                    self._manager.close()
                    _wait_for_failed_reads(captured.size, quiet_for=0.5)
            else:
                self._manager.close()
