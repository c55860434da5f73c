"""Build frozen config dataclasses from YAML-shaped dicts, checking every key and type on the way in.

Errors name the dotted key and what is allowed, so a typo fails before any work starts. Every float field must be
finite and within float32's range, and every integer field must fit in int32 (rates end up in float32 arrays,
steps, sizes and seeds in int32 ones); ranges beyond that are each section's `__post_init__`. An integer beyond
int32 is refused with the field's own range, as its metadata declares it (`slm_jax.config.bounded`): "min" and
"max", or "range" in words.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from slm_jax.errors import UserError


INT_LIMIT = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # rates, scales and factors end up in float32 arrays: beyond it they are inf


class _WrongType(UserError):
    """The value is not of the annotated type (a union tries its next option); other UserErrors are final."""


class _BeyondInt32(UserError):
    """An integer beyond +-INT_LIMIT; `build` words the field's own range when its metadata declares one."""


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` (a field annotation) or raise UserError naming `key`: a value of another type,
    a NaN or infinite float (`.nan`, `.inf` in YAML), a float beyond float32's range, or an integer beyond
    +-(2**31 - 1)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return convert(value, option, key)
            except _WrongType:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_LIMIT:
                raise _BeyondInt32(f"{key} must be between -{INT_LIMIT} and {INT_LIMIT}, got {value}")
            return value
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)  # a string too: YAML 1.1 reads "3e-4" (no dot) as one
            except OverflowError:  # an integer beyond the float range
                number = math.inf
            except ValueError:
                number = None
            if number is not None:
                if not math.isfinite(number):
                    raise UserError(f"{key} must be a finite number, got {value!r}")
                if abs(number) > FLOAT32_MAX:
                    raise UserError(f"{key} must be at most {FLOAT32_MAX:.6g} in size (float32's largest), got "
                                    f"{value!r}")
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item_type = typing.get_args(tp)[0]
            return tuple(convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, f"{key}.")
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {tp}")
    raise _WrongType(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _int_range(field: dataclasses.Field, optional: bool) -> str | None:
    """The integers `field` takes, in words, from its metadata: "range" as written, or "min" to "max" (at most
    INT_LIMIT); else its "allowed" description. None when it declares none of them."""
    meta = field.metadata
    if "range" in meta:
        return meta["range"]
    if "min" in meta:
        high = INT_LIMIT if meta.get("max") is None else meta["max"]
        return f"between {meta['min']} and {high}" + (" or null" if optional else "")
    return meta.get("allowed")


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from `values`, rejecting unknown keys and missing required ones; nested dataclasses
    are built too. A field's metadata "allowed" (e.g. "an integer from 2 to 8 or null") words what it takes in the
    message for a missing or wrong-typed value, and (as do "min", "max" or "range") for an integer beyond int32."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = f"'{prefix}{unknown[0]}'"
        raise UserError(f"unknown config key {where} (allowed in {prefix.rstrip('.') or 'the root'}: "
                        f"{', '.join(sorted(fields))})")
    described = {f.name: f.metadata.get("allowed") for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and (f.default, f.default_factory) == (dataclasses.MISSING,) * 2:
            what = f" ({described[f.name]})" if described[f.name] else ""
            raise UserError(f"{prefix}{f.name} is missing{what}")
    hints = _field_types(cls)
    kwargs = {}
    for name, v in values.items():
        try:
            kwargs[name] = convert(v, hints[name], f"{prefix}{name}")
        except _WrongType:
            if not described[name]:
                raise
            raise UserError(f"{prefix}{name} must be {described[name]}, got {v!r}") from None
        except _BeyondInt32:
            field = next(f for f in dataclasses.fields(cls) if f.name == name)
            allowed = _int_range(field, type(None) in typing.get_args(hints[name]))
            if allowed is None or not isinstance(v, int):
                raise
            raise UserError(f"{prefix}{name} must be {allowed}, got {v}") from None
    return cls(**kwargs)


def to_dict(config) -> dict:
    """A dataclass tree as plain YAML/JSON-able dicts and lists."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(config)
