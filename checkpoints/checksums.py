"""CRC-32 (zlib) checksums of arrays by shard, for states that no one process holds whole (a multi-process run):
each process checksums the shards it owns, keyed by their place in the whole array, and the processes gather what
they found (`allgather_json`). A restore compares every recorded shard that lies within a shard it holds, whatever
layout it restores into: all of them where it holds the arrays whole (one process reading a multi-process save).
The metadata JSON that records them has a CRC-32 of its own (`json_crc32`).
"""
from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

Region = tuple[slice, ...]  # one slice(start, stop) per dimension, both ints: a block of an array


def bytes_crc32(value) -> int:
    """zlib CRC-32 of an array's bytes in C order (any dtype, sub-byte ones such as int4 one byte per value, as numpy
    holds them)."""
    return zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def json_crc32(value: Any) -> int:
    """zlib CRC-32 of `value`'s canonical JSON: as it reads back from a JSON file (tuples as lists, a dict's keys as
    strings), keys sorted, no spaces, ASCII. The same for the metadata a save wrote and for the metadata a reader
    loads from that file, whichever process or Python version wrote it; any edit to a value changes it. TypeError or
    ValueError for what JSON cannot hold (as the save's own JSON writer raises)."""
    canonical = json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canonical.encode("ascii"))


def region_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Region:
    """A shard's global index (`jax.Shard.index`: a slice per dimension, None bounds for a whole dimension) with its
    bounds filled in from the array's `shape`."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def region_key(region: Region) -> str:
    """A region as recorded in metadata: "start:stop" per dimension joined by commas, e.g. "0:64,0:128" for rows
    0-63 of a [128, 128] array; "" for a scalar."""
    return ",".join(f"{s.start}:{s.stop}" for s in region)


def key_region(key: str, shape: tuple[int, ...]) -> Region | None:
    """The region a `region_key` names in an array of `shape`; None when `key` names none there (another number of
    dimensions, bounds outside the shape or decreasing, not a key)."""
    parts = key.split(",") if key else []
    if len(parts) != len(shape):
        return None
    region = []
    for part, n in zip(parts, shape):
        start, colon, stop = part.partition(":")
        if not (colon and start.isdigit() and stop.isdigit() and int(start) <= int(stop) <= n):
            return None
        region.append(slice(int(start), int(stop)))
    return tuple(region)


def owned_shards(array) -> list[tuple[Region, Any]]:
    """(region, data) of each shard of `array` that this process owns: its addressable shards of replica 0, so each
    block of a replicated array is owned by one device of one process. A host (numpy) array is one whole shard."""
    if not isinstance(array, jax.Array):
        value = np.asarray(array)
        return [(tuple(slice(0, n) for n in value.shape), value)]
    return [(region_of(s.index, array.shape), s.data) for s in array.addressable_shards if s.replica_id == 0]


def shard_crc32s(array) -> dict[str, int]:
    """{region key: CRC-32 of the shard's bytes} for the shards of `array` (any shape and dtype) that this process
    owns (`owned_shards`); reads them to the host."""
    shards = owned_shards(array)
    values = jax.device_get([data for _, data in shards])
    return {region_key(region): bytes_crc32(value) for (region, _), value in zip(shards, values)}


def within(inner: Region, outer: Region) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer))


def region_mismatches(array, recorded: dict[str, int]) -> list[str]:
    """The keys of `recorded` ({region key: CRC-32}, `shard_crc32s` of the array as saved, in any layout) whose CRC-32
    differs from this process's bytes of `array` (same shape and dtype as saved). A recorded region is compared when
    it lies within a shard this process owns, sliced from it; the others (held elsewhere, or split across this
    process's shards by another layout) are not compared here."""
    shards = owned_shards(array)
    on_host: dict[int, np.ndarray] = {}  # shard number -> its values, read once
    bad = []
    for key, crc in recorded.items():
        region = key_region(key, tuple(array.shape))
        found = next((i for i, (held, _) in enumerate(shards) if region is not None and within(region, held)), None)
        if found is None:
            continue
        if found not in on_host:
            on_host[found] = np.asarray(jax.device_get(shards[found][1]))
        held = shards[found][0]
        block = on_host[found][tuple(slice(r.start - h.start, r.stop - h.start) for r, h in zip(region, held))]
        if bytes_crc32(block) != crc:
            bad.append(key)
    return bad


def allgather_json(value: Any) -> list:
    """Every process's `value` (anything JSON holds), in process order. A collective: every process of the run calls
    it at the same point (as the others' same call); in a single process it returns [value] without communicating.
    Two `process_allgather`s: the encoded lengths, then the encodings padded to the longest (uint8)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(everyone, lengths)]
