"""`python -m train.launch --processes 2 --devices-per-process 4 -- --config tiny ...`: one machine playing several
hosts. Starts N processes of `python -m train.main` (or `--module`) joined by `jax.distributed` over a free local
port, each with its own CPU devices and JAX's CPU collectives (gloo), prefixes their output with the process id,
and stops the others, saying which one died, when one fails (their own output from then on, their collectives
failing without it, is one line each). Killed itself, even by SIGKILL, it leaves none running: each gets SIGTERM.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import argparse
import functools
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from slm_jax.errors import UserError
from train.cpu_devices import usable_cores, with_device_count
from train.cli import ArgumentParser, main_guard, non_negative_float, positive_int
from train.interrupts import stop_with_parent

POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # passed on to every process (they run in sessions of their own)
MAX_DEVICES_PER_PROCESS = 64
_ONE_LINE_REPORT = re.compile(r"(error: |process \d+: )")  # a child's own one-line ending (train.main)


def most_processes(cores: int) -> int:
    """The most processes the launcher starts on a machine of `cores` cores: 8, or 2 per core on larger machines.
    Every process is a JAX runtime of a few hundred MB on this one machine; asked for 100,000, the launcher used to
    start them until the machine stalled (load average 300 on 2 cores)."""
    return max(8, 2 * cores)


def check_counts(processes: int, devices: int, cores: int) -> None:
    """UserError for more processes than `most_processes(cores)` or more than MAX_DEVICES_PER_PROCESS devices each."""
    if processes > most_processes(cores):
        raise UserError(f"--processes {processes}: the launcher starts every process on this machine, each a JAX "
                        f"runtime of a few hundred MB; at most {most_processes(cores)} here (8, or 2 per core)")
    if devices > MAX_DEVICES_PER_PROCESS:
        raise UserError(f"--devices-per-process {devices}: at most {MAX_DEVICES_PER_PROCESS} simulated CPU devices "
                        f"per process")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int, heartbeat_s: int | None = None,
                base: dict | None = None) -> dict:
    """The environment of process `index` of `processes` that `train.sharding.maybe_initialize_distributed` reads:
    coordinator 127.0.0.1:`port`, JAX_NUM_PROCESSES, JAX_PROCESS_ID; the CPU platform with `devices` devices
    (XLA's --xla_force_host_platform_device_count, added to any XLA_FLAGS of `base`) and gloo collectives;
    SLM_JAX_HEARTBEAT_TIMEOUT_S when `heartbeat_s` is given. `base` defaults to this process's environment."""
    env = dict(os.environ if base is None else base)
    env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "XLA_FLAGS": with_device_count(env.get("XLA_FLAGS", ""), devices),
                "PYTHONUNBUFFERED": "1"})
    if heartbeat_s is not None:
        env["SLM_JAX_HEARTBEAT_TIMEOUT_S"] = str(heartbeat_s)
    return env


def _forward(index: int, stream, lock: threading.Lock, errors_shown: dict[str, int] | None = None,
             peer_failed: Callable[[], int | None] = lambda: None) -> None:
    """Copy a child's output to ours line by line, each line prefixed with `[p<index>] `. An `error: ` line that
    another process already printed word for word (`errors_shown`, shared by the forwarders: line -> the process
    that printed it first) is not repeated: every process refuses the same bad argument alike, and one line says it.
    Once another process has failed (`peer_failed` returns its index) or printed its `error: ` line (it is ending),
    this one's output is its collectives failing without it: a Python traceback, or a native crash report of dozens
    of lines (or one log line) from JAX's distributed service, which can come before the failed process has exited.
    One `launch:` line says so instead, and only the child's own one-line reports (`process N: lost contact ...`,
    `error: ...`) still pass."""
    hidden = False
    for line in iter(stream.readline, ""):
        with lock:
            if errors_shown is not None and line.startswith("error: "):
                if line in errors_shown:
                    continue
                errors_shown[line] = index
            failed = peer_failed()
            if failed is None and errors_shown:
                failed = next((i for i in errors_shown.values() if i != index), None)
            if failed is not None and not _ONE_LINE_REPORT.match(line):
                if not hidden:
                    _say(f"process {index}: not showing the rest of its output (its collectives fail without "
                         f"process {failed})")
                hidden = True
                continue
            sys.stdout.write(f"[p{index}] {line}")
            sys.stdout.flush()
    stream.close()


def _first_failed(children: list, index: int) -> int | None:
    """The index of a process other than `index` that has ended with a non-zero code or by a signal, or None."""
    return next((i for i, child in enumerate(children) if i != index and child.poll() not in (None, 0)), None)


def _first_failure(children: list) -> int | None:
    """The index of the process to report as the failure, or None while none has failed: of those that have ended
    with a non-zero code or by a signal, one ended by a signal first (killed from outside: when it dies, the others'
    collectives fail and they exit with a code, possibly within the same poll), else the lowest index."""
    ended = [(child.poll() > 0, i) for i, child in enumerate(children) if child.poll() not in (None, 0)]
    return min(ended)[1] if ended else None


def _how(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


def _end_running(children: list, running: list[int], wait_s: float, option: str) -> None:
    """Give `running` (indices into `children`) `wait_s` seconds to exit, then SIGKILL those left; say each
    one's end (`option`: the command-line option that set `wait_s`, named in the kill line)."""
    deadline = time.monotonic() + wait_s
    while any(children[i].poll() is None for i in running) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for i in running:
        if children[i].poll() is None:
            children[i].kill()
            children[i].wait()
            _say(f"process {i} killed at once ({option} 0)" if wait_s <= 0 else
                 f"process {i} still running {wait_s:g} s later ({option}): killed")
        else:
            _say(f"process {i} {_how(children[i].returncode)} on its own")


def launch(command: list[str], processes: int, devices: int, grace_s: float, heartbeat_s: int | None,
           stop_s: float = 30.0) -> int:
    """Run `command` (argv after `python`) as `processes` joined processes; returns the exit code for the launcher:
    0 when all exit 0, else the first failure's code (128 + signal number for a signal). When one fails, the others
    get `grace_s` seconds to end on their own (JAX's heartbeat timeout ends them), then SIGKILL; a line says how
    each ended, and their output after the failure is not shown (`_forward`). SIGINT or SIGTERM
    to the launcher (from the main thread) is sent on to every running process, which get `stop_s` seconds to save
    and exit before SIGKILL; the launcher then returns 128 + that signal's number."""
    port, lock, errors_shown = free_port(), threading.Lock(), {}
    children, threads, stop = [], [], []
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in STOP_SIGNALS} \
        if in_main else {}
    try:
        for index in range(processes):
            if stop:
                break
            child = subprocess.Popen([sys.executable, *command], env=process_env(index, processes, devices, port,
                                                                                 heartbeat_s),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=stop_with_parent(os.getpid()))
            children.append(child)
            _say(f"process {index} of {processes}: pid {child.pid}, {devices} CPU devices, coordinator "
                 f"127.0.0.1:{port}")
            threads.append(threading.Thread(target=_forward, args=(index, child.stdout, lock, errors_shown,
                                                                   functools.partial(_first_failed, children, index)),
                                            daemon=True))
            threads[-1].start()
        failed = None
        while any(c.poll() is None for c in children) and failed is None and not stop:
            failed = _first_failure(children)
            time.sleep(POLL_S)
        if stop:
            running = [i for i, c in enumerate(children) if c.poll() is None]
            name = signal.Signals(stop[0]).name
            _say(f"{name}: sending it on to processes {running}; they have {stop_s:g} s to save and stop")
            for i in running:
                children[i].send_signal(stop[0])
            _end_running(children, running, stop_s, "--stop-timeout")
            return 128 + stop[0]
        failed = _first_failure(children) if failed is None else failed
        if failed is None:
            return 0
        code = children[failed].returncode
        running = [i for i, c in enumerate(children) if c.poll() is None]
        _say(f"process {failed} {_how(code)}" + (f"; stopping processes {running}" if running else ""))
        _end_running(children, [i for i in range(len(children)) if i != failed], grace_s, "--grace")
        return code if code > 0 else 128 - code
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
        for thread in threads:
            thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.launch", description=__doc__,
                                     usage="python -m train.launch [options] -- ARGS FOR THE MODULE")
    parser.add_argument("--processes", type=positive_int, default=2, help="how many processes (simulated hosts)")
    parser.add_argument("--devices-per-process", type=positive_int, default=4, help="CPU devices of each process")
    parser.add_argument("--module", default="train.main", help="the module each process runs (python -m MODULE)")
    parser.add_argument("--grace", type=non_negative_float, default=0.0,
                        help="seconds the other processes get to end on their own after one fails, before SIGKILL")
    parser.add_argument("--stop-timeout", type=non_negative_float, default=30.0,
                        help="after Ctrl-C or SIGTERM to the launcher: seconds the processes get to save and stop, "
                             "before SIGKILL")
    parser.add_argument("--heartbeat-timeout", type=positive_int,
                        help="seconds without a heartbeat before JAX declares a process dead (default: "
                             "train.sharding.HEARTBEAT_TIMEOUT_S or $SLM_JAX_HEARTBEAT_TIMEOUT_S)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: the module's own arguments")
    args = parser.parse_args(argv)
    if args.args[:1] == ["--"]:
        args.args = args.args[1:]
    return args


def check_module(name: str) -> None:
    """UserError unless `name` is a module `python -m` can run from here (found without importing it)."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that does not exist, or an empty or relative name
        found = False
    if not found:
        raise UserError(f"--module {name!r} is not a module python can find (e.g. train.main)")


@main_guard
def main(argv=None):
    args = parse_args(argv)
    check_counts(args.processes, args.devices_per_process, usable_cores())
    check_module(args.module)
    try:
        code = launch(["-m", args.module, *args.args], args.processes, args.devices_per_process, args.grace,
                      args.heartbeat_timeout, args.stop_timeout)
    except KeyboardInterrupt:
        _say("interrupted; stopped every process")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
