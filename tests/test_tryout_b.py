"""Data integrity found in a new user's tryout: a resume keeps its data split and batches, the token cache is checked
against its meta.json and the vocabulary, SIGTERM and SIGINT keep the checkpoint being written, a re-run with
nothing to train appends nothing to metrics.jsonl, and a NaN at a session's first step names the data too."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.manager import CheckpointStore

from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.config import load_config
from train.data import DataConfig, load_splits
from train.loop import run_training
from train.metrics import read_metrics
from train.precision import MAX_LOSS_SCALE, LossScale

ROOT = Path(__file__).resolve().parent.parent
quiet = dict(log=lambda *_: None)
TINY = ("model.n_layers=1", "train.sample_tokens=0", "train.eval_every=1000", "train.steps=4", "checkpoint.every=4")


def tiny(run, *overrides):
    return load_config("tiny", [f"data.path={run.corpus}", f"data.cache_dir={run.cache}", *TINY, *overrides])


@pytest.mark.parametrize("key, value, shown", [
    ("data.val_fraction", "0.2", "data.val_fraction 0.1 -> 0.2"),
    ("train.batch_size", "4", "train.batch_size 8 -> 4"),
    ("train.grad_accum", "2", "train.grad_accum 1 -> 2"),
    ("train.seed", "7", "train.seed 0 -> 7"),
])
def test_a_resume_with_another_data_split_or_batch_is_refused_naming_the_key(tiny_run, tmp_path, key, value, shown):
    run = tiny_run(tmp_path / "run", *TINY)
    with pytest.raises(UserError) as refused:
        run_training(tiny(run, "train.steps=8", "train.extend=true", f"{key}={value}"), run.workdir, **quiet)
    assert str(refused.value) == (
        f"{run.workdir / 'checkpoints'} was trained to step 4 with other data or batches ({shown}); resuming would "
        f"change which text trains or which windows each step reads: use the same settings, or another --workdir "
        f"(train.init_from starts a new run from its weights)")
    assert checkpoint_steps(run.workdir) == [4]


def test_a_resume_that_would_train_on_a_held_out_play_is_refused(tmp_path):
    config = lambda *more: load_config("tiny", [*TINY, "train.steps=2", "checkpoint.every=2", *more])
    run_training(config(), tmp_path, **quiet)
    with pytest.raises(UserError, match=r"\(data.val_plays \['hamlet', 'the-tempest', 'twelfth-night'\] -> "
                                        r"\['macbeth'\]\); resuming would change which text trains"):
        run_training(config("data.val_plays=[macbeth]", "train.steps=4", "train.extend=true"), tmp_path, **quiet)


def checkpoint_steps(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_a_resume_over_edited_text_at_the_same_path_is_refused_and_cadence_keys_may_change(tmp_path, corpus_file):
    config = lambda *more: load_config("tiny", [f"data.path={corpus_file}", *TINY, *more])
    run_training(config(), tmp_path / "run", **quiet)
    summary = run_training(config("train.steps=6", "train.extend=true", "train.log_every=1", "train.eval_every=3",
                                  "checkpoint.every=3", "checkpoint.keep=5", f"data.cache_dir={tmp_path / 'c'}"),
                           tmp_path / "run", **quiet)
    assert summary["step"] == 6 and checkpoint_steps(tmp_path / "run") == [4, 6]
    corpus_file.write_text(corpus_file.read_text() + "MORE:\nText that was not there before.\n")
    with pytest.raises(UserError, match=r"other data or batches \(train_tokens \d+ -> \d+; val_tokens \d+ -> \d+\); "):
        run_training(config("train.steps=8", "train.extend=true"), tmp_path / "run", **quiet)
    assert checkpoint_steps(tmp_path / "run") == [4, 6]


def test_a_resume_over_text_or_ids_edited_at_the_same_length_is_refused(tmp_path, corpus_file):
    text_config = lambda *more: load_config("tiny", [f"data.path={corpus_file}", *TINY, *more])
    run_training(text_config(), tmp_path / "text", **quiet)
    text = corpus_file.read_text()
    corpus_file.write_text(text[:100] + ("x" if text[100] != "x" else "y") + text[101:])  # same size, other text
    with pytest.raises(UserError, match=r"other data or batches \(train.bin CRC-32 \d+ -> \d+\); "):
        run_training(text_config("train.steps=8", "train.extend=true"), tmp_path / "text", **quiet)
    assert checkpoint_steps(tmp_path / "text") == [4]
    folder = tmp_path / "bins"
    folder.mkdir()
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
    ids[:-500].tofile(folder / "train.bin")
    ids[-500:].tofile(folder / "val.bin")
    bin_config = lambda *more: load_config("tiny", [f"data.path={folder}", "data.tokenizer=null",
                                                    "data.vocab_size=256", *TINY, *more])
    run_training(bin_config(), tmp_path / "ids", **quiet)
    edited = np.memmap(folder / "val.bin", dtype=np.uint16, mode="r+")
    edited[7] = (int(edited[7]) + 1) % 256
    edited.flush()
    with pytest.raises(UserError, match=r"other data or batches \(val.bin CRC-32 \d+ -> \d+\); "):
        run_training(bin_config("train.steps=8", "train.extend=true"), tmp_path / "ids", **quiet)
    assert checkpoint_steps(tmp_path / "ids") == [4]


def test_a_resume_naming_the_same_corpus_another_way_is_accepted(tmp_path, corpus_file):
    config = lambda path, *more: load_config("tiny", [f"data.path={path}", *TINY, *more])
    run_training(config(corpus_file), tmp_path / "run", **quiet)
    (tmp_path / "link.txt").symlink_to(corpus_file)  # the same file under another name
    summary = run_training(config(tmp_path / "link.txt", "train.steps=6", "train.extend=true"), tmp_path / "run",
                           **quiet)
    assert summary["step"] == 6
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text())  # the same text in another file is another corpus
    with pytest.raises(UserError, match=r"other data or batches \(data.path "):
        run_training(config(other, "train.steps=8", "train.extend=true"), tmp_path / "run", **quiet)


def poison_id(folder: Path) -> None:
    ids = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r+")
    ids[len(ids) // 2] = 300  # beyond the byte tokenizer's 256 ids


def truncate(folder: Path) -> None:
    path = folder / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])


def garble_meta(folder: Path) -> None:
    (folder / "meta.json").write_text('{"train_tokens": ')


def swap_ids(folder: Path) -> None:
    ids = np.memmap(folder / "val.bin", dtype=np.uint16, mode="r+")
    first = next(i for i in range(1, len(ids)) if ids[i] != ids[0])
    ids[0], ids[first] = ids[first], ids[0]  # valid ids, same size: only the checksum sees it


def drop_crc(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    del meta["crc32"]  # as written before caches recorded CRC-32s
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, why", [
    (poison_id, r"has train.bin holding id 300 at position \d+, outside the tokenizer's 256 ids"),
    (truncate, r"has train.bin of \d+ bytes, but meta.json says \d+ uint16 tokens \(\d+ bytes\)"),
    (garble_meta, r"has an unreadable meta.json \(JSONDecodeError\)"),
    (swap_ids, "has val.bin whose CRC-32 differs from the one recorded when it was written"),
    (drop_crc, "was made before token caches recorded CRC-32s"),
], ids=["id-beyond-vocab", "truncated", "bad-meta", "changed-bytes", "no-checksums"])
def test_a_damaged_token_cache_is_rebuilt_from_the_corpus_with_a_note(tmp_path, corpus_file, capsys, damage, why):
    cfg = DataConfig(path=str(corpus_file), cache_dir=str(tmp_path / "cache"))
    first = load_splits(cfg)
    expected = (np.array(first.train), np.array(first.val), first.description)
    [folder] = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    capsys.readouterr()
    damage(folder)
    again = load_splits(cfg)
    assert re.fullmatch(f"note: the token cache {re.escape(str(folder))} {why}; rebuilding it from data.path "
                        f"{re.escape(str(corpus_file))}", capsys.readouterr().err.strip())
    np.testing.assert_array_equal(again.train, expected[0])
    np.testing.assert_array_equal(again.val, expected[1])
    assert again.description == expected[2]
    load_splits(cfg)
    assert capsys.readouterr().err == ""  # checked once rebuilt: no note


def test_a_re_run_with_nothing_to_train_appends_nothing_to_metrics_jsonl(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", *TINY)
    before = (run.workdir / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(run.workdir / "metrics.jsonl") if r.get("final")] == [4]
    summary = run_training(tiny(run), run.workdir, **quiet)
    assert summary["step"] == 4 and summary["final"]
    assert (run.workdir / "metrics.jsonl").read_text() == before


def test_a_nan_at_the_first_step_of_a_resume_names_the_data_and_the_checkpoint_before_the_learning_rate(tiny_run,
                                                                                                      tmp_path):
    run = tiny_run(tmp_path / "run", *TINY)
    config = tiny(run, "train.steps=8", "train.extend=true")
    store = CheckpointStore(run.workdir / "checkpoints", keep=5, async_save=False)
    state = store.restore(abstract_state(config, build_model(config)), 4)
    huge = {**state.params, "lm_head": {"kernel": jnp.full_like(state.params["lm_head"]["kernel"], 1e38)}}  # finite
    store.save(5, state.replace(params=huge, step=jnp.full_like(state.step, 5)), {**store.metadata(4), "step": 5})
    store.close()
    with pytest.raises(UserError) as stopped:
        run_training(config, run.workdir, **quiet)
    assert str(stopped.value) == (
        f"loss became nan at step 6 (the first step of this session); stopped without saving (last good checkpoint: "
        f"5 in {run.workdir / 'checkpoints'}); check the data (data.path, the token cache) and the checkpoint of "
        f"step 5 it resumed from; try a lower train.learning_rate or train.grad_clip")


SIGNAL_RUN = ("model.d_model=16", "model.seq_len=16", "train.batch_size=4", "train.steps=40", "train.sample_tokens=0",
              "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1", "checkpoint.keep=2")


def train_command(workdir: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "train.main", "--config", "tiny", "--workdir", str(workdir),
            *(arg for o in (f"data.path={corpus}", *SIGNAL_RUN) for arg in ("--set", o))]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"SPEAKER{i % 7}:\nThe quick brown fox {i} jumps over the lazy dog.\n\n"
                              for i in range(800)))
    done = subprocess.run(train_command(root / "run", corpus), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return corpus, losses(root / "run")


# SIGTERM only: train.main stops on SIGINT through the same handler (train.interrupts.STOP; SIGINT mid-step in
# tests/test_train.py), and each case costs a training subprocess and its resume (about 12 s of the suite's budget)
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated")], ids=["SIGTERM"])
def test_a_signal_during_a_save_keeps_that_checkpoint_and_the_run_resumes_exactly(uninterrupted, tmp_path, sig, code,
                                                                                 word):
    corpus, reference = uninterrupted
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_command(workdir, corpus), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while True:  # signal while a save is being written (its temporary folder exists) after a complete one
        names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
        writing = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
        if writing and any(n.isdigit() for n in names):
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word
    kept = checkpoint_steps(workdir)
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]  # no unfinished save left
    assert max(kept) >= writing[0]  # the save in flight at the signal was finished, not dropped
    assert re.search(rf"^interrupted after step \d+: the latest checkpoint is step {max(kept)} in "
                     rf"{re.escape(str(workdir / 'checkpoints'))}; the same command resumes from it$", out, re.M), out
    resumed = subprocess.run(train_command(workdir, corpus), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {max(kept)} " in resumed.stdout
    assert losses(workdir) == reference


def test_a_resume_refused_for_another_quant_config_prints_nothing_first_and_keeps_quant_plan_json(tiny_run,
                                                                                                     tmp_path):
    run = tiny_run(tmp_path / "run", *TINY, "quant.mode=qat", "quant.weight_bits=8")
    saved_plan = (run.workdir / "quant_plan.json").read_text()
    lines = []
    with pytest.raises(UserError, match=r"different quant config \(quant.weight_bits: 8 -> 4"):
        run_training(tiny(run, "quant.mode=qat", "quant.weight_bits=4"), run.workdir, log=lines.append)
    assert lines == [] and (run.workdir / "quant_plan.json").read_text() == saved_plan


def test_validation_during_training_reads_the_same_windows_for_the_same_effective_batch(tmp_path, corpus_file):
    config = lambda *more: load_config("tiny", [f"data.path={corpus_file}", *TINY, "train.steps=2",
                                                "train.eval_batches=3", *more])
    logs = {"whole": [], "split": []}
    whole = run_training(config("train.batch_size=8"), tmp_path / "whole", log=logs["whole"].append)
    split = run_training(config("train.batch_size=4", "train.grad_accum=2"), tmp_path / "split",
                         log=logs["split"].append)
    # the same 3 x 8 windows, the same weights up to the order of the gradient sum: the same loss
    assert whole["val_loss"] == pytest.approx(split["val_loss"], abs=1e-5)
    assert re.search(r"over 3 batches x 8 windows x \d+ tokens", "\n".join(logs["whole"]))
    assert re.search(r"over 6 batches x 4 windows x \d+ tokens", "\n".join(logs["split"]))


def test_a_config_that_repeats_a_key_is_refused_naming_the_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("inherit: tiny\ntrain:\n  steps: 5\n  log_every: 1\n  steps: 7\n")
    with pytest.raises(UserError, match=r"is not valid YAML: duplicate key 'steps' \(line 5\)$"):
        load_config(str(path), [])
    # the same key in different mappings (each rule's match and weight_bits) is no repetition
    path.write_text("inherit: tiny\nquant:\n  mode: qat\n  rules:\n    - {match: attn, weight_bits: 4}\n"
                    "    - {match: mlp, weight_bits: 8}\n")
    assert [rule.weight_bits for rule in load_config(str(path), []).quant.rules] == [4, 8]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"], ids=["empty", "comments", "document-marker"])
def test_an_empty_config_file_is_refused_rather_than_training_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"^config {re.escape(str(path))} is empty; give its sections, or "
                                        r"`inherit: baseline` to start from a named config$"):
        load_config(str(path), [])


def test_fp16_runs_log_their_loss_scale_and_count_the_steps_they_skipped(tiny_run, tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "ref", *TINY)
    # Start at the ceiling: the first steps' scaled gradients overflow float16, are skipped, and halve the scale.
    monkeypatch.setattr("train.steps.LossScale.create",
                        lambda enabled: LossScale(scale=jnp.float32(MAX_LOSS_SCALE), good_steps=jnp.int32(0),
                                                  enabled=enabled))
    lines = []
    run_training(tiny(run, "train.precision=fp16", "train.log_every=1"), tmp_path / "fp16", log=lines.append)
    records = [r for r in read_metrics(tmp_path / "fp16" / "metrics.jsonl") if "loss_scale" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    scales = [r["loss_scale"] for r in records]
    # Each record holds the scale its step ran with; a skipped step halves the next one's, a good one keeps it.
    for before, after, record in zip(scales, scales[1:], records):
        assert after == (before / 2 if record["skipped_steps"] else before)
    assert records[0] == {**records[0], "loss_scale": MAX_LOSS_SCALE, "skipped_steps": 1}
    shown = [line for line in lines if line.startswith("step ")]
    assert shown[0].startswith("step      1/4 | loss ") and "| loss scale 1.67772e+07, 1 skipped" in shown[0]


def test_a_resume_with_other_optimizer_settings_says_what_changed(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", *TINY)
    lines = []
    summary = run_training(tiny(run, "train.steps=4", "train.grad_clip=0.5", "train.beta2=0.99"), run.workdir,
                           log=lines.append)
    assert summary["step"] == 4
    assert ("note: resuming step 4 with changed settings (train.beta2 0.95 -> 0.99; train.grad_clip 1.0 -> 0.5)"
            in lines), lines
    lines.clear()
    run_training(tiny(run, "train.steps=4"), run.workdir, log=lines.append)
    assert not [line for line in lines if line.startswith("note: resuming")]


def test_evaluate_reads_an_earlier_step_when_the_latest_is_damaged(tiny_run, tmp_path, capsys):
    from train.evaluate import main as evaluate_main
    run = tiny_run(tmp_path / "run", *TINY, "checkpoint.every=2", "checkpoint.keep=2")
    assert checkpoint_steps(run.workdir) == [2, 4]
    (run.workdir / "checkpoints" / "4" / "metadata" / "metadata").unlink()
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--workdir", str(run.workdir), "--batches", "1", "--batch-size", "4"])
    assert exited.value.code == 2 and "has no readable metadata" in capsys.readouterr().err
    evaluate_main(["--workdir", str(run.workdir), "--batches", "1", "--batch-size", "4", "--step", "2"])
    table = capsys.readouterr().out
    assert re.search(rf"^{re.escape(str(run.workdir))}\s+2\s+none\s+\d", table, re.M), table
