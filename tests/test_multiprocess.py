"""Multi-process (multi-host) runs on one machine: `python -m train.launch` starts 2 processes of `train.main`, each
with 2 CPU devices, joined by `jax.distributed` over a free local port with gloo collectives, on a data=2 x fsdp=2
mesh spanning both. The reference is one process with 4 devices on the same mesh shape. Checkpoints cross between 1
and 2 processes both ways for float, INT4 QAT and LoRA-over-INT4-serving runs; the single-process tools refuse to
run as several launched copies."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from checkpoints.gguf_export import main as gguf_export_main
from checkpoints.hf_export import main as hf_export_main
from checkpoints.hf_import import main as hf_import_main
from quant.convert import main as convert_main
from quant.merge import main as merge_main
from quant.report import main as report_main
from train.evaluate import main as evaluate_main
from train.generate import main as generate_main
from train.main import main as train_main
from train.cli import launched_many
from train.evaluation import evaluate_workdir
from train.cpu_devices import with_device_count
from train.launch import free_port, process_env
from train.ptq import convert_workdir
from train.run import load_run
from train.sharding import coordination_timeouts
from slm_jax.errors import UserError
from tests.disk_damage import rewrite_on_disk

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5  # the killed run's heartbeat timeout: the survivor must be gone well within BOUND_S
BOUND_S = 40
TIMEOUT_S = 300  # any one subprocess


def settings(corpus, *extra):
    """A tiny run whose learning rate does not depend on train.steps (constant after one warmup step), so runs of
    different lengths follow the same trajectory step by step."""
    return ["--config", "tiny", "--set", f"data.path={corpus}", "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
            "--set", "train.log_every=1", "--set", "train.eval_every=2", "--set", "train.eval_batches=2",
            "--set", "train.warmup_steps=1", "--set", "train.min_lr_ratio=1.0", "--set", "train.sample_tokens=0",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep=5", *[a for e in extra for a in ("--set", e)]]


def one_process(workdir, corpus, *extra):
    """`train.main` in one process with 4 CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), 4)}
    result = subprocess.run([sys.executable, "-m", "train.main", *settings(corpus, *extra), "--workdir", str(workdir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def launch(workdir, corpus, *extra, launcher=()):
    """`python -m train.launch` with 2 processes of 2 CPU devices each, output piped (stderr merged)."""
    return subprocess.Popen([sys.executable, "-m", "train.launch", "--processes", "2", "--devices-per-process", "2",
                             *launcher, "--", *settings(corpus, *extra), "--workdir", str(workdir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was recorded twice (by two processes?): {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_two_processes_match_one_restore_both_ways_and_survive_a_kill(tmp_path, corpus_file):
    # One process, 4 devices: the reference trajectory, with checkpoints at steps 2, 4 and 6.
    ref = tmp_path / "one"
    one_process(ref, corpus_file, "train.steps=6")
    expected, expected_val = losses(ref), val_losses(ref)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # Two processes of 2 devices, the same data=2 x fsdp=2 mesh: the same losses and validation losses.
    two = tmp_path / "two"
    proc = launch(two, corpus_file, "train.steps=6")
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:]
    got = losses(two)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in expected], [expected[s] for s in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose([val_losses(two)[s] for s in expected_val], list(expected_val.values()), atol=1e-5)
    progress = [line for line in out.splitlines() if re.match(r"\[p\d\] (step|eval|done|model)", line)]
    assert progress and all(line.startswith("[p0] ") for line in progress), progress  # only process 0 reports
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in two.iterdir()}

    # 2 -> 1: the checkpoint the two processes wrote restores in this single-device process, equal to the
    # one-process run's params at the same step.
    for step in (4, 6):
        a, b = load_run(ref, step).variables["params"], load_run(two, step).variables["params"]
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5), a, b)

    # 1 -> 2: the one-process run's step-2 checkpoint resumed by two processes, which go on (steps 3 and 4 must
    # match the reference) until process 1 is SIGKILLed.
    killed = tmp_path / "killed"
    shutil.copytree(ref, killed)
    for step in (4, 6):
        shutil.rmtree(killed / "checkpoints" / str(step))
    (killed / "metrics.jsonl").unlink()
    proc = launch(killed, corpus_file, "train.steps=100000", "train.extend=true",  # resumes with a longer schedule
                  launcher=("--heartbeat-timeout", str(HEARTBEAT_S), "--grace", str(BOUND_S)))
    lines, pids = [], {}
    for line in proc.stdout:
        lines.append(line)
        if match := re.match(r"launch: process (\d) of 2: pid (\d+)", line):
            pids[int(match[1])] = int(match[2])
        if line.startswith("[p0] step      6/"):
            break
    assert "resuming from step 2" in "".join(lines), "".join(lines)[-3000:]
    resumed = losses(killed)
    np.testing.assert_allclose([resumed[s] for s in (3, 4, 5, 6)], [expected[s] for s in (3, 4, 5, 6)], atol=1e-5)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    rest, _ = proc.communicate(timeout=BOUND_S + 30)
    elapsed = time.monotonic() - killed_at
    assert elapsed < BOUND_S, f"the survivor took {elapsed:.0f} s to exit"
    assert "process 1 was killed by SIGKILL" in rest, rest[-3000:]
    assert re.search(r"process 0 (exited with code|was killed by SIG\w+) .*on its own", rest), rest[-3000:]
    assert proc.returncode == 128 + signal.SIGKILL
    # the survivor's failing collectives (a JaxRuntimeError, or JAX's native crash report at the heartbeat timeout)
    # are one line, its own or the launcher's, never a traceback
    assert "Traceback" not in rest and "Check failure" not in rest and len(rest.splitlines()) <= 6, rest[-3000:]

    # The last complete checkpoint is readable, and a rerun (here in one process: 2 -> 1 again) resumes from it.
    last = load_run(killed)
    assert last.step >= 4 and last.step % 2 == 0
    out = one_process(killed, corpus_file, f"train.steps={last.step + 1}", "train.extend=true")
    assert f"resuming from step {last.step}" in out and f"step {last.step + 1:>6}/{last.step + 1}" in out

    # SIGTERM to the launcher, which passes it on: both processes stop at the same step boundary and save that step
    # together (checkpoint.every is far away) and exit 143; the saved step is the latest, its records written.
    begun = last.step + 1
    run = ("train.steps=100000", "train.extend=true", "checkpoint.every=1000")
    proc = launch(killed, corpus_file, *run)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"[p0] step {begun + 3:>6}/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    saved = re.search(r"\[p0\] saved step (\d+) on the interrupt: the (\d+) step\(s\) trained since", rest)
    assert saved and int(saved[1]) >= begun + 3 and int(saved[2]) == int(saved[1]) - begun, "".join(lines) + rest
    assert rest.count("exited with code 143 on its own") == 2 and "): killed" not in rest, rest[-3000:]
    assert load_run(killed).step == int(saved[1]) and max(losses(killed)) == int(saved[1])  # records and state agree

    # Bytes of that step changed on disk (valid files, which Orbax reads without complaint): both processes of a
    # resume refuse it alike (the launcher shows their error line once), from the CRC-32s its shards were saved with.
    rewrite_on_disk(killed / "checkpoints" / saved[1], "params/lm_head/kernel")
    proc = launch(killed, corpus_file, *run)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    errors = [line for line in out.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
    assert re.fullmatch(rf"\[p\d\] error: checkpoint \S+/checkpoints/{saved[1]} is damaged: the bytes of "
                        r"params/lm_head/kernel differ from the CRC-32 recorded when it was saved; other steps "
                        r"here: .*", errors[0]), errors


GLOO_LOST_PEER = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection "
                  "closed by peer [127.0.0.1]:44236")  # what a collective raised when its peer was SIGKILLed


@pytest.mark.parametrize("error, lost", [(jax.errors.JaxRuntimeError(GLOO_LOST_PEER), True),
                                         (ValueError(GLOO_LOST_PEER.replace("closed", "reset")), True),
                                         (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"), False),
                                         (RuntimeError(GLOO_LOST_PEER), False)])
def test_a_collective_that_lost_its_peer_is_one_line_and_exit_1(error, lost, monkeypatch, capsys):
    import train.main
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def train_that_fails(argv):
        raise error
    monkeypatch.setattr(train.main, "train", train_that_fails)
    if not lost:  # any other error is not this one: it propagates as it was
        with pytest.raises(type(error)):
            train_main([])
        return
    with pytest.raises(SystemExit) as exited:
        train_main([])
    assert exited.value.code == 1
    assert capsys.readouterr().err == ("process 0: lost contact with another process during a collective (it exited "
                                       "or was killed); the last checkpoint is intact, resume with the same command\n")


@pytest.mark.parametrize("error, line", [(UserError("checkpoint runs/a/checkpoints/30 is damaged: ..."),
                                          "error: checkpoint runs/a/checkpoints/30 is damaged: ..."),
                                         (PermissionError(13, "Permission denied", "runs/a/metrics.jsonl"),
                                          "error: Permission denied: runs/a/metrics.jsonl")])
def test_a_user_error_in_one_process_of_several_ends_it_at_once_in_one_line(error, line, monkeypatch):
    # the others, still in a restore or a collective, never reach jax.distributed's shutdown barrier: a normal exit
    # waited on it, then aborted with a native stack trace (SIGABRT, exit 134) instead of exit 2
    import train.main
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(train.main, "in_command", lambda: True)
    ended = []

    def exit_now(code, text):
        ended.append((code, text))
        raise SystemExit(code)

    def train_that_fails(argv):
        raise error
    monkeypatch.setattr(train.main, "exit_now", exit_now)
    monkeypatch.setattr(train.main, "train", train_that_fails)
    with pytest.raises(SystemExit):
        train_main([])
    assert ended == [(2, line)]


INT4_QAT = ("model.n_layers=1", "quant.mode=qat", "quant.weight_bits=4", "quant.granularity=per_group",
            "quant.group_size=16", "quant.scale_dtype=bfloat16", "train.steps=4")


def assert_same_params(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                                   np.asarray(y, np.float32), rtol=0, atol=1e-5),
                           load_run(a, 4).variables["params"], load_run(b, 4).variables["params"])


def resume_from_step_2(source, dest):
    """A copy of `source` cut back to its step-2 checkpoint (its later checkpoint and its metrics gone)."""
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "checkpoints" / "4")
    (dest / "metrics.jsonl").unlink()
    return dest


def test_qat_and_int4_serving_checkpoints_cross_between_one_and_two_processes(tmp_path, corpus_file):
    # INT4 QAT, 1 -> 2: two processes resume a one-process run's step-2 checkpoint; steps 3-4 and the step-4
    # validation loss are the one-process run's. 2 -> 1: their step-4 checkpoint holds the one-process run's params.
    qat_one = tmp_path / "qat_one"
    one_process(qat_one, corpus_file, *INT4_QAT)
    qat_two = resume_from_step_2(qat_one, tmp_path / "qat_two")
    proc = launch(qat_two, corpus_file, *INT4_QAT)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "resuming from step 2" in out, out[-3000:]
    expected, got = losses(qat_one), losses(qat_two)
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [expected[3], expected[4]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(val_losses(qat_two)[4], val_losses(qat_one)[4], rtol=0, atol=1e-5)
    assert_same_params(qat_one, qat_two)

    # INT4 serving: the two-process QAT checkpoint, converted here, is the frozen base of LoRA adapters that two
    # processes train. 1 -> 2: they read its int4 weights and scales, written by one process. 2 -> 1: the adapters
    # they wrote, read here over the base, give the validation loss they measured.
    base = convert_workdir(qat_two, tmp_path / "int4", log=lambda line: None)
    lora = tmp_path / "lora"
    proc = launch(lora, corpus_file, "finetune.method=lora", f"finetune.base={base}", "finetune.lora_rank=4",
                  "train.steps=4")
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "LoRA over" in out, out[-3000:]
    measured = val_losses(lora)
    assert abs(measured[4] - measured[2]) > 1e-4  # the adapters move the loss far more than the tolerance below
    np.testing.assert_allclose(evaluate_workdir(lora, 2, 8)["loss"], measured[4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("main, argv", [
    (evaluate_main, ["--workdir", "runs/a"]),
    (generate_main, ["--workdir", "runs/a"]),
    (convert_main, ["--workdir", "runs/a", "--bits", "4", "--out", "runs/b"]),
    (merge_main, ["--workdir", "runs/a", "--out", "runs/b"]),
    (report_main, ["--workdir", "runs/a"]),
    (gguf_export_main, ["--workdir", "runs/a", "--out", "runs/a.gguf"]),
    (hf_export_main, ["--workdir", "runs/a", "--out", "runs/b"]),
    (hf_import_main, ["hf/a", "--out", "runs/b"]),
])
def test_single_process_tools_refuse_to_run_as_one_of_several(main, argv, monkeypatch, capsys):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert re.fullmatch(r"error: python -m \S+ runs in one process \(JAX_NUM_PROCESSES=2 is set\): start it once, "
                        r"without train.launch, srun or mpirun\n", err), err


def test_a_conversion_by_train_main_refuses_to_run_as_one_of_several_and_writes_nothing(tmp_path, corpus_file,
                                                                                         monkeypatch, capsys):
    # quant.mode=serve makes train.main a conversion: each launched copy would convert and write the same run.
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    served = tmp_path / "served"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", "tiny", "--set", f"data.path={corpus_file}", "--set", "quant.mode=serve",
                    "--set", "quant.weight_bits=4", "--set", f"train.init_from={tmp_path / 'qat'}",
                    "--workdir", str(served)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == ("error: python -m train.main with quant.mode=serve runs in one "
                                                 "process (JAX_NUM_PROCESSES=2 is set): start it once, without "
                                                 "train.launch, srun or mpirun\n"), err
    assert not served.exists()


def test_launched_many_reads_the_launchers_process_counts():
    assert launched_many({}) is None and launched_many({"JAX_NUM_PROCESSES": "1"}) is None
    assert launched_many({"SLURM_STEP_NUM_TASKS": "4"}) == "SLURM_STEP_NUM_TASKS=4"
    assert launched_many({"OMPI_COMM_WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "1"}) == "OMPI_COMM_WORLD_SIZE=8"
    assert launched_many({"TPU_WORKER_HOSTNAMES": "w0,w1"}) is None  # a slice's workers, not copies of the command
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES must be a whole number of processes, got 'two'"):
        launched_many({"JAX_NUM_PROCESSES": "two"})


def test_launcher_environment_joins_processes_on_cpu():
    env = process_env(1, 2, 3, 4567, heartbeat_s=7, base={"XLA_FLAGS": "--xla_foo=1 "
                                                               "--xla_force_host_platform_device_count=8"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("2", "1", "cpu")
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and env["SLM_JAX_HEARTBEAT_TIMEOUT_S"] == "7"
    assert 0 < free_port() < 65536


def test_coordination_timeouts_from_the_environment():
    assert coordination_timeouts({"SLM_JAX_HEARTBEAT_TIMEOUT_S": "5"}) == {
        "initialization_timeout": 120, "heartbeat_timeout_seconds": 5, "shutdown_timeout_seconds": 60}
    with pytest.raises(UserError, match="SLM_JAX_INIT_TIMEOUT_S"):
        coordination_timeouts({"SLM_JAX_INIT_TIMEOUT_S": "0"})
