"""`QuantConfig`: the `quant` section of the root config, and `QuantRule` per-layer overrides.

A rule field left at `INHERIT` takes the section's value; `weight_bits: null` in a rule keeps that layer float.
"""
from __future__ import annotations

import dataclasses
import re

from slm_jax.errors import UserError

MODES = ("none", "qat", "serve")
GRANULARITIES = ("per_channel", "per_group")
NUMERICS = ("auto", "int", "fake")
SCALE_DTYPES = ("float32", "bfloat16")
BIT_WIDTHS = range(2, 9)  # what AQT's integer numerics support
INHERIT = "inherit"


def check_bits(value, key: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in BIT_WIDTHS:
        raise UserError(f"{key} must be an integer from 2 to 8{' or null (float)' if allow_none else ''}, "
                        f"got {value!r}")


def check_choice(value, allowed, key: str) -> None:
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    match: str  # regex searched in the layer path, e.g. "layer_0/mlp/up", "attn/(q|k|v)", "lm_head"
    weight_bits: int | None | str = INHERIT
    act_bits: int | None | str = INHERIT
    granularity: str = INHERIT
    group_size: int | str = INHERIT

    def validate(self, index: int) -> None:
        key = f"quant.rules[{index}]"
        try:
            re.compile(self.match)
        except re.error as err:
            raise UserError(f"{key}.match is not a valid regex ({err})") from None
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if value != INHERIT:
                check_bits(value, f"{key}.{name}")
        if self.granularity != INHERIT:
            check_choice(self.granularity, GRANULARITIES, f"{key}.granularity")
        if self.group_size != INHERIT and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                           or self.group_size <= 0):
            raise UserError(f"{key}.group_size must be a positive integer, got {self.group_size!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    mode: str = "none"  # none | qat (quantization-aware training) | serve (weights stored as integers)
    weight_bits: int | None = 8
    act_bits: int | None = None  # null: weight-only quantization
    embed_bits: int | None = None  # the token embedding table (per-column scales); null: float
    granularity: str = "per_channel"  # per_channel | per_group (sub-channel scales along the contracting axis)
    group_size: int = 32
    bwd_bits: int | None = None  # null: float gradients; 8: AQT's quantized backward pass
    numerics: str = "auto"  # int (integer matmul) | fake (dequantize, then float matmul) | auto (fake on CPU)
    scale_dtype: str = "float32"  # dtype of the weight scales, as trained and as stored: float32 | bfloat16
    rules: tuple[QuantRule, ...] = ()

    def __post_init__(self):
        check_choice(self.mode, MODES, "quant.mode")
        check_bits(self.weight_bits, "quant.weight_bits")
        check_bits(self.act_bits, "quant.act_bits")
        check_bits(self.embed_bits, "quant.embed_bits")
        check_choice(self.granularity, GRANULARITIES, "quant.granularity")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise UserError(f"quant.group_size must be a positive integer, got {self.group_size!r}")
        if self.bwd_bits is not None:
            check_bits(self.bwd_bits, "quant.bwd_bits", allow_none=False)
        check_choice(self.numerics, NUMERICS, "quant.numerics")
        check_choice(self.scale_dtype, SCALE_DTYPES, "quant.scale_dtype")
        for i, rule in enumerate(self.rules):
            rule.validate(i)
