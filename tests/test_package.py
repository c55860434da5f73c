"""The package as a user installs it: a built wheel, installed outside the repository, finds its configs and trains."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_installed_elsewhere_trains_tiny_from_another_directory(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(  # the build writes beside it
        ".git", ".venv", "venv", "runs", "build", "*.egg-info", "__pycache__", "fixtures", "docs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("slm_jax-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    shipped = sorted(p.name for p in (site / "configs").glob("*.yaml"))
    assert "tiny.yaml" in shipped and shipped == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    # PYTHONPATH comes before the editable install of the checkout, so the wheel's modules are the ones imported.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import train.config as c; print(c.__file__, c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "configs"
    run = subprocess.run([sys.executable, "-m", "train.main", "--config", "tiny", "--workdir", "run",
                          "--set", "train.steps=2", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (elsewhere / "run" / "checkpoints").is_dir() and "done: 2 steps" in run.stdout
