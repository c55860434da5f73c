"""What every command-line tool shares: argument helpers and the one-line error exit (code 2)."""
from __future__ import annotations

import functools
import sys

from slm_jax.errors import UserError

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
