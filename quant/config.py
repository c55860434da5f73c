"""`QuantConfig`: the `quant` section of the root config, and `QuantRule` per-layer overrides.

A rule field left at `INHERIT` takes the section's value; `weight_bits: null` in a rule keeps that layer float.
`scheme` picks the numerics: AQT's (any bits, scales as configured) or one of ggml's block formats (fixed).
"""
from __future__ import annotations

import dataclasses
import re

from quant import ggml
from slm_jax.config import bounded
from slm_jax.errors import UserError

MODES = ("none", "qat", "serve")
GRANULARITIES = ("per_channel", "per_group")
NUMERICS = ("auto", "int", "fake")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
SCHEMES = ("aqt",) + ggml.SCHEMES
KV_BITS = (None, 8)
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


_ALLOWED = {  # what a rule's fields take, as errors word it (train.config_loader.build)
    "match": "a regex searched in each layer's path, e.g. {match: lm_head, weight_bits: null}",
    "bits": "an integer from 2 to 8, null (keep the layer float) or left out (the section's value)",
    "granularity": f"one of {', '.join(GRANULARITIES)} or left out (the section's value)",
    "group_size": "a positive integer or left out (the section's value)",
}


@dataclasses.dataclass(frozen=True)
class QuantRule:
    # regex searched in the layer path, e.g. "layer_0/mlp/up", "attn/(q|k|v)", "lm_head"
    match: str = dataclasses.field(metadata={"allowed": _ALLOWED["match"]})
    weight_bits: int | None | str = dataclasses.field(default=INHERIT, metadata={"allowed": _ALLOWED["bits"]})
    act_bits: int | None | str = dataclasses.field(default=INHERIT, metadata={"allowed": _ALLOWED["bits"]})
    granularity: str = dataclasses.field(default=INHERIT, metadata={"allowed": _ALLOWED["granularity"]})
    group_size: int | str = dataclasses.field(default=INHERIT, metadata={"allowed": _ALLOWED["group_size"]})

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
    weight_bits: int | None = bounded(8, 2, 8)
    act_bits: int | None = bounded(None, 2, 8)  # null: weight-only quantization
    embed_bits: int | None = bounded(None, 2, 8)  # the token embedding table (per-column scales); null: float
    granularity: str = "per_channel"  # per_channel | per_group (sub-channel scales along the contracting axis)
    group_size: int = bounded(32, 1)
    bwd_bits: int | None = bounded(None, 2, 8)  # null: float gradients; 8: AQT's quantized backward pass
    numerics: str = "auto"  # int (integer matmul) | fake (dequantize, then float matmul) | auto (fake on CPU)
    scale_dtype: str = "float32"  # dtype of the weight scales, as trained and as stored: float32 | bfloat16
    # KV cache when generating: null (compute dtype) | 8 (int8, scale per token and head)
    kv_bits: int | None = dataclasses.field(default=None, metadata={"range": "null or 8"})
    # CPU serving with int numerics: re-quantize weight-only per-group (INT4) layers at load to int8 per channel
    # (faster decode, approximate weights: quant.serving.per_channel_int8); false serves the exact codes
    serve_per_channel_int8: bool = False
    rules: tuple[QuantRule, ...] = ()
    scheme: str = "aqt"  # aqt | ggml_q8_0 | ggml_q4_0 (llama.cpp's blocks of 32 weights, float16 scale each)

    def __post_init__(self):
        check_choice(self.mode, MODES, "quant.mode")
        check_choice(self.scheme, SCHEMES, "quant.scheme")
        if self.scheme in ggml.SCHEMES:
            self._fix_ggml_fields()
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
        if isinstance(self.kv_bits, bool) or self.kv_bits not in KV_BITS:
            raise UserError(f"quant.kv_bits must be null or 8, got {self.kv_bits!r}")
        if self.serve_per_channel_int8 and self.numerics != "int":
            raise UserError(f"quant.serve_per_channel_int8 re-quantizes for CPU int8 dots: it needs quant.numerics "
                            f"int (train.generate --numerics int), not {self.numerics}")
        for i, rule in enumerate(self.rules):
            rule.validate(i)

    @property
    def quantizes_activations(self) -> bool:
        """True when a quantized model (mode qat or serve) quantizes some layer's inputs (act_bits, or a rule's)."""
        bits = [self.act_bits, *(rule.act_bits for rule in self.rules if rule.act_bits != INHERIT)]
        return self.mode != "none" and any(b is not None for b in bits)

    def _fix_ggml_fields(self) -> None:
        """A ggml scheme fixes the weights' bits, blocks and scale dtype: each such key may be left at its default
        or set to the scheme's own value; the resolved config then holds the scheme's values."""
        fixed = {"weight_bits": ggml.BITS[self.scheme], "granularity": "per_group", "group_size": ggml.BLOCK,
                 "scale_dtype": "float16"}
        for key, value in fixed.items():
            default = QuantConfig.__dataclass_fields__[key].default
            if getattr(self, key) not in (default, value):
                raise UserError(f"quant.{key}: scheme {self.scheme} fixes it to {value!r}; remove the key, "
                                f"got {getattr(self, key)!r}")
            object.__setattr__(self, key, value)
        for key in ("act_bits", "embed_bits", "bwd_bits"):
            if getattr(self, key) is not None:
                raise UserError(f"quant.{key} must be null with scheme {self.scheme} (weight-only ggml blocks; "
                                f"the embedding table and gradients stay float), got {getattr(self, key)!r}")
        for i, rule in enumerate(self.rules):
            if rule.weight_bits not in (INHERIT, None, *ggml.BITS.values()):
                raise UserError(f"quant.rules[{i}].weight_bits must be null (float), 8 (Q8_0) or 4 (Q4_0) with "
                                f"scheme {self.scheme}, got {rule.weight_bits!r}")
            if rule.act_bits not in (INHERIT, None) or (rule.granularity, rule.group_size) != (INHERIT, INHERIT):
                raise UserError(f"quant.rules[{i}]: only match and weight_bits can be set with scheme {self.scheme} "
                                f"(ggml fixes blocks of {ggml.BLOCK} weights and float activations)")
