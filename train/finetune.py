"""The parameter partition of fine-tuning that trains the model's own params (full or continued QAT): params whose
path matches `finetune.freeze` get no updates and no optimizer state. (LoRA's partition, adapters vs frozen base, is
`train.lora_run`.)
"""
from __future__ import annotations

import re

import jax
import optax

from checkpoints.manager import key_path_str
from slm_jax.errors import UserError


def with_frozen(tx: optax.GradientTransformation, pattern: str | None) -> optax.GradientTransformation:
    """`tx` for params whose path does not match `pattern`; params that do get zero updates and no optimizer
    state (optax.multi_transform with set_to_zero). UserError (at init) if the regex matches no param or all."""
    if pattern is None:
        return tx
    regex = re.compile(pattern)

    def labels(params):
        paths = {key_path_str(p): p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        frozen = [name for name in paths if regex.search(name)]
        if not frozen:
            raise UserError(f"finetune.freeze {pattern!r} matches no parameter (paths look like: "
                            f"{', '.join(list(paths)[:3])}, ...)")
        if len(frozen) == len(paths):
            raise UserError(f"finetune.freeze {pattern!r} matches every parameter; nothing would train")
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if regex.search(key_path_str(p)) else "trained", params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
