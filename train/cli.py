"""What every command-line tool shares: the one-line error exit (code 2) and the quantization-scheme flags that
`python -m quant.convert` and `python -m quant.report` both take. A library: it never imports a command-line module.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from quant.config import QuantConfig
from slm_jax.errors import UserError
from train.config import read_yaml
from train.config_loader import build

USER_ERROR_EXIT = 2


def main_guard(fn):
    """Run a CLI main; a UserError prints `error: <one line>` to stderr and exits with code 2."""
    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapper


def add_scheme_args(parser: argparse.ArgumentParser) -> None:
    """--bits, --act-bits, --granularity, --group-size, --embed-bits, --scale-dtype, --rules: a serving scheme."""
    group = parser.add_argument_group("quantization scheme (default: the scheme a QAT run trained with)")
    group.add_argument("--bits", type=int, help="weight bits, 2..8 (8 and 4 are the usual)")
    group.add_argument("--act-bits", type=int, help="also quantize activations to this many bits (default: float)")
    group.add_argument("--granularity", choices=("per_channel", "per_group"),
                       help="default: per_group for 4 bits or fewer, else per_channel")
    group.add_argument("--group-size", type=int, default=32, help="input features per scale with per_group")
    group.add_argument("--embed-bits", type=int, help="also quantize the token embedding table (default: float)")
    group.add_argument("--scale-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype of the stored weight scales")
    group.add_argument("--rules", type=Path, help="YAML file with a list of per-layer rules (or a `rules:` key), "
                                                  "e.g. [{match: lm_head, weight_bits: null}]")


def scheme_from_args(args: argparse.Namespace) -> QuantConfig | None:
    """The serving QuantConfig the `add_scheme_args` flags describe, validated like the `quant` config section
    (None when --bits is absent). UserError for a refinement without --bits or an invalid value."""
    if args.bits is None:
        if (args.act_bits, args.granularity, args.rules, args.embed_bits) != (None,) * 4 or \
                args.scale_dtype != "float32":
            raise UserError("--act-bits, --granularity, --rules, --embed-bits and --scale-dtype refine a scheme: "
                            "give --bits too")
        return None
    granularity = args.granularity or ("per_group" if args.bits <= 4 else "per_channel")
    values = {"mode": "serve", "weight_bits": args.bits, "act_bits": args.act_bits, "granularity": granularity,
              "group_size": args.group_size, "embed_bits": args.embed_bits, "scale_dtype": args.scale_dtype,
              "rules": read_rules(args.rules) if args.rules else []}
    return build(QuantConfig, values, prefix="quant.")


def read_rules(path: Path) -> list:
    """The per-layer rules in a YAML file (a list, or a mapping with the one key `rules`); UserError otherwise."""
    values = read_yaml(path, "rules file")
    if isinstance(values, dict) and set(values) == {"rules"}:
        values = values["rules"]
    if not isinstance(values, list) or not all(isinstance(rule, dict) for rule in values):
        raise UserError(f"rules file {path} must hold a list of rules such as [{{match: lm_head, weight_bits: null}}]")
    return values
