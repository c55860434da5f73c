"""The README's commands, as a newcomer runs them: every documented `python -m` module exists and takes every flag
the README gives it, and the fast (tiny) commands run in the order shown on a fresh folder."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"((?:[A-Z_]+=\S+ +)*)python -m ([\w.]+)((?: +[^`|#\n]*)?)")


def readme_commands(with_env: bool = False) -> list[tuple]:
    """(module, argument text) of every `python -m` command in README.md, in order (pip/pytest/venv excluded;
    continued lines joined); with `with_env`, (environment assignments before it, module, arguments)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    found = [(m.group(1), m.group(2), " ".join(m.group(3).split())) for m in COMMAND.finditer(text)]
    found = [f for f in found if f[1].split(".")[0] in ("train", "quant", "checkpoints")]
    return found if with_env else [(module, args) for _, module, args in found]


HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv, buffer = [module, "--help"], io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code
    out[module] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


def test_every_readme_command_names_a_module_that_takes_its_flags():
    commands = readme_commands()
    modules = sorted({module for module, _ in commands})
    assert {"train.main", "train.generate", "train.evaluate", "quant.convert", "quant.report"} <= set(modules)
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    for module, args in commands:
        assert helps[module][0] == 0, f"python -m {module} --help exited {helps[module][0]}"
        own, _, forwarded = args.partition(" -- ")  # train.launch passes what follows `--` to train.main
        for owner, part in [(module, own)] + ([("train.main", forwarded)] if forwarded else []):
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", part):
                assert flag in helps[owner][1], f"README: python -m {module} {args}: {flag} is not a flag of {owner}"


def test_the_readme_tiny_commands_run_in_order_on_a_fresh_folder(tmp_path):
    # train.launch's multi-process commands are exercised by tests/test_multiprocess.py
    tiny = [c for c in readme_commands(with_env=True) if "--config tiny" in c[2] and c[1] == "train.main"]
    assert len(tiny) >= 3
    for env, module, args in tiny:
        proc = subprocess.run(f"{env}{sys.executable} -m {module} {args}", shell=True, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"python -m {module} {args}:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
