"""Checkpoint format versions and the migrations that read older ones.

Every checkpoint's metadata records the format it was written in; on load, older metadata is upgraded one version
at a time, so the rest of the code only ever sees the current format.
"""
from __future__ import annotations

from typing import Callable

from slm_jax.errors import UserError

FORMAT_VERSION = 2


def migrate_1_to_2(metadata: dict) -> dict:
    """Version 2 records the per-layer quantization plan; version 1 had none, so it reads as null.

    Null means "no plan recorded": the run's `config.quant` section still says how it was quantized, and
    `quant.plan.make_plan` re-derives the per-layer plan from it.
    """
    return {"project_version": "unknown", "created": "unknown", **metadata, "format_version": 2,
            "quant_plan": None}


# format_version -> the function that upgrades metadata of that version to the next one.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: migrate_1_to_2}


def upgrade(metadata, where: str) -> dict:
    """Metadata of any known format as the current format (with `migrated_from` set if it was older).

    `where` names the checkpoint in error messages.
    """
    if not isinstance(metadata, dict):
        raise UserError(f"checkpoint {where} has metadata that is not a JSON object; it was not written by slm-jax")
    version = metadata.get("format_version")
    if version is None:
        raise UserError(f"checkpoint {where} has no format_version in its metadata; it was not written by slm-jax")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"checkpoint {where} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint format {version} is newer than this slm-jax understands ({FORMAT_VERSION}); "
                        f"upgrade slm-jax (checkpoint {where})")
    original = version
    while version < FORMAT_VERSION:
        metadata = MIGRATIONS[version](metadata)
        version = metadata["format_version"]
    return metadata if original == FORMAT_VERSION else {**metadata, "migrated_from": original}
