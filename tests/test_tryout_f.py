"""Faults a tryout of data folders, resuming, TensorBoard, inspect and GGUF export found: a data folder says what it
holds, settings that cannot apply are named in a note or left out, and each scalar is logged once per step."""
from __future__ import annotations

import collections
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints.gguf_export import LLAMA_CPP_NO_EOS, export_workdir
from checkpoints.inspect import config_summary, main as inspect_main
from checkpoints.manager import CheckpointStore
from slm_jax.errors import UserError
from train import main as train_main
from train.corpus import text_files
from train.config import load_config
from train.data import DataConfig, ignored_text_note
from train.loop import run_training
from train.observe import TensorBoardLog
from train.run import keep_init_from, same_folder
from train.token_ids import eos_note

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make, said", [
    (lambda d: [(d / name).mkdir() for name in ("b", "a")],
     r"it holds only 2 folders \(a, b\); a folder is read at its top level only: give a glob instead, e\.g\. "
     r"'.*/data/\*\*/\*\.txt' for the \.txt files below it$"),
    (lambda d: None, r"it is empty$"),
    (lambda d: [(d / f"{name}.md").write_text("x") for name in "abcd"],
     r"it holds 4 other files \(a\.md, b\.md, c\.md, \.\.\.\); .* e\.g\. '.*/data/\*\.md'$"),
    (lambda d: ((d / "sub").mkdir(), (d / "notes.md").write_text("x")),
     r"it holds 1 folder \(sub\) and 1 other file \(notes\.md\); .*'.*/data/\*\*/\*\.txt'"),
])
def test_a_data_folder_without_text_says_what_it_holds(tmp_path, make, said):
    """A folder with no .txt file directly in it said "no .txt files" alone, also when it held only folders of
    them: the message names what it found and that a folder is read at its top level only."""
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    with pytest.raises(UserError, match=said) as err:
        text_files(str(folder))
    message = str(err.value)
    assert message.startswith(f"data.path: {folder} is a folder with no .txt files") and "\n" not in message


def test_train_main_on_a_folder_of_folders_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "data" / "part1").mkdir(parents=True)
    (tmp_path / "data" / "part1" / "a.txt").write_text("text")
    with pytest.raises(SystemExit) as exited:
        train_main.main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set",
                         f"data.path={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert "it holds only 1 folder (part1)" in err and "**/*.txt" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_of_bin_pair_and_text_notes_that_the_text_is_ignored(tmp_path):
    """nanoGPT's prepare.py leaves input.txt beside train.bin/val.bin: training read the .bin files without a word
    about the text; now a note says which it reads and that the .txt files are ignored (none without them)."""
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        np.arange(1, 4, dtype=np.uint16).tofile(folder / name)
    cfg = DataConfig(path=str(folder), tokenizer=None, vocab_size=500)
    assert ignored_text_note(cfg) is None
    (folder / "input.txt").write_text("text")
    (folder / "more.txt").write_text("text")
    note = ignored_text_note(cfg)
    assert note.startswith(f"note: data.path {folder} holds nanoGPT's train.bin/val.bin and 2 .txt files (input.txt, "
                           f"more.txt): training reads the pre-tokenized train.bin/val.bin, and the .txt files are "
                           f"ignored") and f"'{folder}/*.txt'" in note and "\n" not in note
    assert ignored_text_note(DataConfig(path=str(folder / "input.txt"))) is None


def test_a_resume_with_another_init_from_notes_it_and_keeps_the_recorded_one(tmp_path, tiny_run):
    """A resume ignored a changed train.init_from without a word and would save the new value as the run's origin
    (its lineage, e.g. for an imported model's token ids, then named a run its weights never came from): it is
    noted with both values, and the config the run goes on with keeps the recorded one."""
    run, other = tiny_run(tmp_path / "run"), tiny_run(tmp_path / "other")
    printed = []
    sets = [f"data.path={run.corpus}", f"data.cache_dir={run.cache}", "train.sample_tokens=0", "train.eval_batches=1"]
    config = load_config("tiny", [*sets, f"train.init_from={other.workdir}"])
    run_training(config, run.workdir, log=printed.append)
    assert [line for line in printed if "train.init_from" in line] == [
        f"note: resuming step 30 of a run started from scratch (train.init_from unset): train.init_from="
        f"{other.workdir} does not apply, as train.init_from only sets a new run's first weights; the run keeps its "
        f"recorded value; to start from {other.workdir}, train into another --workdir"], printed
    store = CheckpointStore(run.workdir / "checkpoints", create=False)
    try:
        assert keep_init_from(store, config, log=printed.append).train.init_from is None
    finally:
        store.close()
    assert same_folder(str(other.workdir), str(other.workdir / ".." / "other"))  # written otherwise: no change
    assert not same_folder(str(other.workdir), str(run.workdir)) and not same_folder(None, str(run.workdir))


def scalar_counts(directory) -> collections.Counter:
    """How many scalar events each (tag, step) has in the TensorBoard event files under `directory` (TFRecord
    framing: uint64 length, uint32 CRC of it, the Event proto, uint32 CRC of it; checksums not verified)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    counts = collections.Counter()
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            counts.update((value.tag, event.step) for value in event.summary.value)
    return counts


def test_tensorboard_logs_each_scalar_once_per_step(tmp_path):
    """The last step's record and the final summary both hold ms_per_step and tokens_per_s (metrics.jsonl keeps
    both records): TensorBoard got each twice at that step; now the first is kept and the repeat dropped."""
    pytest.importorskip("tensorboardX")
    log = TensorBoardLog(tmp_path / "tb")
    log.open(0)
    log.write({"step": 30, "loss": 2.0, "ms_per_step": 4.0, "tokens_per_s": 64.0, "eta_s": 0.0, "time": 1.0})
    log.write({"step": 30, "final": True, "params": 10, "val_loss": 2.5, "ms_per_step": 4.0, "tokens_per_s": 64.0,
               "time": 2.0})
    log.write({"step": 31, "loss": 1.5, "tokens_per_s": 60.0, "time": 3.0})
    log.close()
    counts = scalar_counts(tmp_path / "tb")
    assert counts == {(tag, 30): 1 for tag in ("loss", "ms_per_step", "tokens_per_s", "eta_s", "params",
                                              "val_loss")} | {("loss", 31): 1, ("tokens_per_s", 31): 1}


def test_inspect_shows_only_the_settings_that_applied(capsys):
    """A run trained on the user's text (data.path) showed the bundled corpus's val_plays and genres, which it never
    used, and not its val_fraction; the data and finetune lines now hold only what applied to the run."""
    inspect_main([str(ROOT / "tests" / "fixtures" / "v2_tiny")])
    data_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  data "))
    assert data_line.split() == ["data", "path=corpus.txt", "val_fraction=0.1"]

    def lines(*sets, data=None):
        summary = config_summary(load_config("tiny", list(sets)).to_dict(), data)
        return {line.split()[0]: line.split()[1:] for line in summary}

    bundled = lines()
    assert bundled["data"] == ["path=None", "tokenizer=byte", "val_plays=hamlet,the-tempest,twelfth-night",
                               "genres=all"]
    assert bundled["finetune"] == ["method=none", "freeze=None"]
    ids = lines("data.path=/ids", "data.tokenizer=null", "data.vocab_size=500", data={"pretokenized": True})
    assert ids["data"] == ["path=/ids", "tokenizer=None", "vocab_size=500"]
    lora = lines("finetune.method=lora", "finetune.base=/base")
    assert lora["finetune"] == ["base=/base", "method=lora", "lora_rank=8", "lora_alpha=16.0", "lora_dropout=0.0",
                                "lora_targets=attn/(q|v)|mlp/(gate|up|down)"]


def test_gguf_export_of_a_byte_run_notes_that_it_has_no_end_of_text_token(tmp_path, tiny_run):
    """A byte-level run's GGUF file has no tokenizer.ggml.eos_token_id (the byte vocabulary has no end-of-text id to
    give: its 256 ids are the bytes), and the export said nothing, so llama.cpp's run-on generation was a surprise;
    now a note says so, and none is invented. A tokenizer that adds an end token, or an imported model's id, needs
    no note."""
    run = tiny_run(tmp_path / "run")
    printed = []
    export_workdir(run.workdir, tmp_path / "model.gguf", "f32", log=printed.append)
    notes = [line for line in printed if line.startswith("note:")]
    assert notes == [f"note: the tokenizer of {run.workdir} has no end-of-text token (its 256 ids are the bytes, and "
                     f"its training text has no end marker), so the file holds no tokenizer.ggml.eos_token_id; "
                     f"llama.cpp then takes its gpt2 default, id 11, which this model never learnt to end with: it "
                     f"generates until its token limit (give llama.cpp -n N)"]
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    assert "tokenizer.ggml.eos_token_id" not in fields and not fields["tokenizer.ggml.add_bos_token"].contents()
    assert eos_note(run.workdir, "byte", {"eos_token_id": 2}, LLAMA_CPP_NO_EOS) is None
    assert eos_note(run.workdir, "file", {"eos_token_id": [2, 7]}, LLAMA_CPP_NO_EOS) is None
    assert "no imported model in the run's lineage names one" in eos_note(run.workdir, "file", {"eos_token_id": []},
                                                                          LLAMA_CPP_NO_EOS)
