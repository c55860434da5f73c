"""What every command-line tool shares: argument types, the one-line error exit (code 2), the refusal of a
single-process tool started as several processes, and the quantization-scheme flags that `python -m quant.convert`
and `python -m quant.report` both take. A library: it never imports a command-line module.

The types check a numeric flag when it is parsed (finite, in range, an integer where one is meant), so a bad value
stops the command before any work, with argparse's usage line, one `error: argument --flag: ...` line and exit 2.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import select
import signal
import sys
from pathlib import Path
from typing import Callable

from quant.config import SCALE_DTYPES, SCHEMES, QuantConfig
from slm_jax.errors import UserError
from train.config import read_yaml
from train.config_loader import build
from train.interrupts import (Terminated, exit_now, in_command, interrupted_unseen, restore_after_loading,
                              say_line)

USER_ERROR_EXIT = 2
INT_LIMIT = 2**31 - 1  # counts, sizes, steps and seeds end up in int32 arrays
DEFAULT_GROUP_SIZE = 32  # --group-size


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {INT_LIMIT} in size, got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def int_in(low: int, high: int = INT_LIMIT) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            bound = f">= {low}" if high == INT_LIMIT else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (in (low, high] with `low_open`)."""
    def parse(text: str) -> float:
        value = _float(text)
        if value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be a number {_range(low, high, low_open)}, got {text}")
        return value
    return parse


def _range(low: float, high: float, low_open: bool) -> str:
    if high == math.inf:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


positive_int = int_in(1)
non_negative_int = int_in(0)
finite_float = float_in()
positive_float = float_in(0.0, low_open=True)
non_negative_float = float_in(0.0)
probability = float_in(0.0, 1.0)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, "(default: X)", where it has one (not None or False) that its help text
    does not already name."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += ("; " if text else "") + "default: %(default)s"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors follow the project's rule for bad input: one line on stderr, `error: <prog>:
    <message> (--help shows the usage)`, and exit code 2 (argparse prints its usage block above the message); its
    --help names the options' defaults (`DefaultsHelpFormatter`) unless another formatter is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        say_line(f"error: {self.prog}: {message} (--help shows the usage)")
        sys.exit(USER_ERROR_EXIT)


def path_arg(text: str) -> Path:
    """argparse type: a file or folder path; an empty one is refused (Path("") would silently mean the current
    folder, e.g. `--out ''` writing into it), and so is one that is not UTF-8 (a byte Python holds as a lone
    surrogate): TensorStore, under Orbax, cannot take it, and train.main failed only at its first save."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UTF-8 path (character {err.start}), which checkpoints "
                                         f"cannot be written to or read from: rename it") from None
    return Path(text)


def existing_folder(text: str) -> Path:
    """argparse type: a path that is an existing folder (a mistyped one is refused, never silently unused)."""
    path = path_arg(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} " + ("is not a folder" if path.exists() else "does not exist"))
    return path


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    """`--base DIR` (args.base, a Path or None) for commands that read LoRA runs: where a run's base is now. DIR
    must exist, for any run (other runs do not read it)."""
    parser.add_argument("--base", type=existing_folder,
                        help="LoRA runs: the folder their base serving run is in now, if it moved (its fingerprint "
                             "must be the one the adapters recorded)")


def main_guard(fn):
    """Run a CLI main; a UserError prints `error: <one line>` to stderr and exits with code 2, and so does an
    OSError the user's environment causes (a read-only folder, a file where a folder belongs, a missing parent, no
    permission, a full disk), naming the path. Ctrl-C (KeyboardInterrupt) prints `interrupted` and exits 130, SIGTERM
    (Terminated) `terminated` and 143, in a command's own process at once (`train.interrupts.exit_now`), after the
    command's `finally` blocks ran.

    A stdout whose reader went away (`... | head -3`) ends the command silently with CLOSED_STDOUT_EXIT, as a Unix
    tool killed by SIGPIPE: Python ignores SIGPIPE, so the write raised BrokenPipeError ("error: Broken pipe", exit
    2), or, when the output was still buffered, Python's flush at shutdown printed "Exception ignored ...
    BrokenPipeError" (exit 120). stdout is flushed before the command returns, and pointed at os.devnull once its
    reader is gone, so nothing is left for that flush to fail on."""
    @functools.wraps(fn)
    def wrapper(argv=None):
        restore_after_loading()
        try:
            try:
                result = fn(argv)
            except SystemExit as exit_:  # argparse's --help, or a command's own sys.exit
                if exit_.code in (0, None):
                    sys.stdout.flush()
                raise
            sys.stdout.flush()  # a closed stdout is found here, not by Python's own flush at shutdown
            unseen = interrupted_unseen()
            if unseen:  # a Ctrl-C (SIGTERM) Python dropped: the work is done, the exit code still says so
                say_line(f"{_STOPPED[unseen == signal.SIGTERM]}: the work was complete when the command could "
                         f"stop")
                sys.exit(128 + unseen)
            return result
        except BrokenPipeError as err:
            if not stdout_reader_gone():  # another pipe (a child process's): an error like any other OSError
                say_line(f"error: {os_error_line(err)}")
                sys.exit(USER_ERROR_EXIT)
            sys.exit(CLOSED_STDOUT_EXIT)
        except UserError as err:
            say_line(f"error: {err}")
            sys.exit(USER_ERROR_EXIT)
        except OSError as err:
            say_line(f"error: {os_error_line(err)}")
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
            code, line = (143, _STOPPED[True]) if isinstance(err, Terminated) else (130, _STOPPED[False])
            if in_command():  # a command's own process: end it before XLA's teardown can crash it
                exit_now(code, line)
            say_line(line)
            sys.exit(code)
        finally:
            if stdout_reader_gone():  # whatever ended the command: Python's flush at shutdown must find no pipe
                stdout_to_devnull()
    return wrapper


CLOSED_STDOUT_EXIT = 128 + signal.SIGPIPE  # 141: what a shell reports for a tool killed by SIGPIPE


def stdout_reader_gone() -> bool:
    """Whether this process's stdout is a pipe (or socket) whose reader has closed it: poll() reports an error on
    its write end. False for a terminal or a file, and where stdout has no file descriptor (a test's capture)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def stdout_to_devnull() -> None:
    """Point file descriptor 1 at os.devnull (Python's recipe for a closed pipe), so what sys.stdout still buffers
    is flushed there at shutdown instead of failing with "Exception ignored ... BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


_STOPPED = {False: "interrupted", True: "terminated"}  # main_guard's line for Ctrl-C (False) and SIGTERM (True)


def os_error_line(err: OSError) -> str:
    """An OSError as one line: what failed and on which path(s), e.g. "Read-only file system: runs/a/config.yaml"."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    what = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
    return f"{what}: {paths}" if paths else what


# Variables with which a launcher tells each process it is one of several copies of the same command.
LAUNCH_COUNTS = ("JAX_NUM_PROCESSES", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def launched_many(env=None) -> str | None:
    """`NAME=N` for the first of `LAUNCH_COUNTS` in `env` (default os.environ) that says more than one process runs
    this command (`python -m train.launch`, `srun`, `mpirun`), or None. A TPU slice's worker list is not counted: it
    describes the machine, not how many copies of this command were started."""
    env = os.environ if env is None else env
    for name in LAUNCH_COUNTS:
        text = (env.get(name) or "1").strip()
        if not text.isdigit():
            raise UserError(f"{name} must be a whole number of processes, got {text!r}")
        if int(text) > 1:
            return f"{name}={text}"
    return None


def require_one_process(tool: str, env=None) -> None:
    """Refuse to run the single-process `tool` (e.g. "python -m train.evaluate") as one of several launched copies,
    which would each do the whole work and write the same files: UserError naming the variable that says so
    (`launched_many`). Call it before any JAX work."""
    launched = launched_many(env)
    if launched:
        raise UserError(f"{tool} runs in one process ({launched} is set): start it once, without train.launch, "
                        f"srun or mpirun")


def add_scheme_args(parser: argparse.ArgumentParser) -> None:
    """--scheme, --bits, --act-bits, --granularity, --group-size, --embed-bits, --scale-dtype, --rules: a serving
    scheme."""
    group = parser.add_argument_group("quantization scheme (default: the scheme a QAT run trained with)")
    group.add_argument("--scheme", choices=SCHEMES, help="aqt (default) or one of llama.cpp's block formats, which "
                                                         "fix bits, blocks of 32 and float16 scales")
    group.add_argument("--bits", type=int_in(2, 8), help="weight bits, 2..8 (8 and 4 are the usual)")
    group.add_argument("--act-bits", type=int_in(2, 8),
                       help="also quantize activations to this many bits (default: float)")
    group.add_argument("--granularity", choices=("per_channel", "per_group"),
                       help="default: per_group for 4 bits or fewer, else per_channel")
    group.add_argument("--group-size", type=positive_int, help="input features per scale with per_group (default 32)")
    group.add_argument("--embed-bits", type=int_in(2, 8),
                       help="also quantize the token embedding table (default: float)")
    group.add_argument("--scale-dtype", choices=SCALE_DTYPES,
                       help="dtype of the stored weight scales (default: bfloat16 for 4 bits or fewer, as ptq_int4 "
                            "and int4_qat; float32 otherwise, as ptq_int8; float16 with a ggml --scheme)")
    group.add_argument("--rules", type=path_arg, help="YAML file with a list of per-layer rules (or a `rules:` key), "
                                                  "e.g. [{match: lm_head, weight_bits: null}]")


def scheme_from_args(args: argparse.Namespace) -> QuantConfig | None:
    """The serving QuantConfig the `add_scheme_args` flags describe, validated like the `quant` config section
    (None when --bits and --scheme are absent); 4 bits or fewer default to per-group bfloat16 scales, more bits to
    per-channel float32 scales, as the ptq_int4 and ptq_int8 configs. UserError for a refinement without --bits,
    --scheme aqt without --bits (which would otherwise mean "the QAT run's own scheme") or an invalid value."""
    if args.scheme not in (None, "aqt"):
        if (args.bits, args.act_bits, args.granularity, args.group_size, args.embed_bits,
                args.scale_dtype) != (None,) * 6:
            raise UserError(f"--scheme {args.scheme} fixes bits, blocks and scales: give only --rules with it")
        values = {"mode": "serve", "scheme": args.scheme, "rules": read_rules(args.rules) if args.rules else []}
        return build(QuantConfig, values, prefix="quant.")
    if args.bits is None:
        if (args.act_bits, args.granularity, args.group_size, args.rules, args.embed_bits,
                args.scale_dtype) != (None,) * 6:
            raise UserError("--act-bits, --granularity, --group-size, --rules, --embed-bits and --scale-dtype refine "
                            "a scheme: give --bits too")
        if args.scheme == "aqt":  # asked for by name: never silently replaced by a QAT run's own (ggml) scheme
            raise UserError("--scheme aqt needs --bits (e.g. --scheme aqt --bits 4); without --scheme, a QAT run "
                            "keeps the scheme it trained with")
        return None
    granularity = args.granularity or ("per_group" if args.bits <= 4 else "per_channel")
    if args.group_size is not None and granularity != "per_group":
        raise UserError(f"--group-size sets per-group scales; --bits {args.bits} quantizes {granularity} here "
                        f"(give --granularity per_group with it)")
    scale_dtype = args.scale_dtype or ("bfloat16" if args.bits <= 4 else "float32")
    values = {"mode": "serve", "weight_bits": args.bits, "act_bits": args.act_bits, "granularity": granularity,
              "group_size": args.group_size or DEFAULT_GROUP_SIZE, "embed_bits": args.embed_bits,
              "scale_dtype": scale_dtype,
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
