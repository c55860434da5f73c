"""Data sources and tokenizers in the pipeline: BPE trained on the training split alone, uint32 caches, folders
and globs of text, nanoGPT's train.bin/val.bin, model.vocab_size taken from the tokenizer, and one-line errors."""
import zlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from slm_jax.errors import UserError
from train import data
from train.config import load_config
from train.data import DataConfig, load_splits
from train.tokenizer import train_bpe

TRAIN_TEXT = "".join(f"alpha beta gamma {i} delta\n" for i in range(400))
VAL_TEXT = "zyzzyva " * 300


@pytest.fixture
def split_file(tmp_path):
    """A corpus whose validation part (the last 10%) holds a word the training part never has."""
    path = tmp_path / "corpus.txt"
    train_len = 9 * len(VAL_TEXT)
    path.write_text((TRAIN_TEXT * (train_len // len(TRAIN_TEXT) + 1))[:train_len] + VAL_TEXT)
    return path


def test_bpe_is_trained_on_the_training_split_only(split_file):
    splits = load_splits(DataConfig(path=str(split_file), tokenizer="bpe", vocab_size=400))
    text = split_file.read_text()
    train_text, val_text = text[:int(len(text) * 0.9)], text[int(len(text) * 0.9):]
    assert splits.tokenizer.to_json() == train_bpe(train_text, 400).to_json()
    assert len(splits.tokenizer.encode(" zyzzyva")) > 1  # never seen in training: not one merged token
    assert len(train_bpe(text, 400).encode(" zyzzyva")) == 1  # as it would be, had validation leaked in
    reference = Tokenizer.from_str(splits.tokenizer.to_json())
    assert splits.train.tolist() == reference.encode(train_text).ids
    assert splits.val.tolist() == reference.encode(val_text).ids and splits.val.dtype == np.uint16
    assert splits.chars_per_token == pytest.approx(len(val_text) / len(reference.encode(val_text).ids))
    assert splits.description["tokenizer"] == splits.tokenizer.describe()
    again = load_splits(DataConfig(path=str(split_file), tokenizer="bpe", vocab_size=400))
    assert again.train.filename == splits.train.filename and again.tokenizer.sha256 == splits.tokenizer.sha256
    byte = load_splits(DataConfig(path=str(split_file)))
    assert byte.train.filename != splits.train.filename and byte.chars_per_token == 1.0


def test_vocabularies_over_65536_ids_are_cached_as_uint32(tmp_path):
    words = [f"w{i:05d}" for i in range(70_000)]  # 6 characters each: the 90% cut falls on a space
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    ids = np.random.default_rng(0).integers(0, 70_000, 1000)
    corpus.write_text(" ".join(words[i] for i in ids))
    splits = load_splits(DataConfig(path=str(corpus), tokenizer=str(tmp_path / "tokenizer.json")))
    assert splits.train.dtype == splits.val.dtype == np.uint32 and splits.description["dtype"] == "uint32"
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), ids)


def test_a_folder_or_glob_of_text_files_is_one_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file " * 20)
    (folder / "a.txt").write_text("first file " * 20)
    (folder / "notes.md").write_text("not text of the corpus")
    joined = "first file " * 20 + "\n" + "second file " * 20
    cut = int(len(joined) * 0.9)
    for path in (folder, folder / "*.txt", tmp_path / "**" / "?.txt"):
        splits = load_splits(DataConfig(path=str(path)))
        assert splits.tokenizer.decode(splits.train) == joined[:cut]
        assert splits.tokenizer.decode(splits.val) == joined[cut:]


def write_bin_pair(folder, train_ids, val_ids):
    folder.mkdir(exist_ok=True)
    np.asarray(train_ids, np.uint16).tofile(folder / "train.bin")
    np.asarray(val_ids, np.uint16).tofile(folder / "val.bin")
    return folder


def test_nanogpt_bin_pair_is_read_as_it_is(tmp_path):
    rng = np.random.default_rng(0)
    train_ids, val_ids = rng.integers(0, 50257, 5000), rng.integers(0, 50257, 500)
    folder = write_bin_pair(tmp_path / "owt", train_ids, val_ids)
    splits = load_splits(DataConfig(path=str(folder), tokenizer=None, vocab_size=50304))
    np.testing.assert_array_equal(splits.train, train_ids)
    np.testing.assert_array_equal(splits.val, val_ids)
    assert splits.chars_per_token is None and splits.tokenizer.kind == "none"  # bits/char: unknown, not wrong
    bpe = train_bpe(TRAIN_TEXT, 300)
    (tmp_path / "tokenizer.json").write_text(bpe.to_json())
    text_ids = bpe.encode(TRAIN_TEXT)
    with_tok = load_splits(DataConfig(path=str(write_bin_pair(tmp_path / "own", text_ids, text_ids[:100])),
                                      tokenizer=str(tmp_path / "tokenizer.json")))
    assert with_tok.chars_per_token == pytest.approx(len(bpe.decode(text_ids[:100])) / 100)


def test_every_pre_tokenized_id_is_checked_not_only_the_first_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SCAN_CHUNK", 64)  # the file spans many chunks; the bad id sits in a late one
    train_ids = np.arange(1000) % 500
    train_ids[777] = 60000
    folder = write_bin_pair(tmp_path / "owt", train_ids, [1, 2, 3])
    with pytest.raises(UserError, match=r"train.bin holds id 60000 at position 777, outside the tokenizer's 500 ids"):
        load_splits(DataConfig(path=str(folder), tokenizer=None, vocab_size=500))


def test_token_file_crc32_matches_zlib_over_the_whole_file_in_any_chunking(tmp_path, monkeypatch):
    ids = np.random.default_rng(1).integers(0, 65535, 1001).astype(np.uint16)
    expected = zlib.crc32(ids.tobytes())
    for chunk in (1, 7, 64, 1 << 24):
        monkeypatch.setattr(data, "SCAN_CHUNK", chunk)
        assert data.crc32(ids) == expected


@pytest.mark.parametrize("setup, settings, message", [
    (lambda d: write_bin_pair(d, [1, 2, 3], [1, 2, 3]), dict(), "holds pre-tokenized ids; set data.tokenizer"),
    (lambda d: write_bin_pair(d, [1, 2, 3], [1, 999, 3]), dict(tokenizer=None, vocab_size=500),
     "val.bin holds id 999 at position 1, outside the tokenizer's 500 ids"),
    (lambda d: (write_bin_pair(d, [1, 2], [1, 2]) / "val.bin").unlink(), dict(tokenizer=None, vocab_size=500),
     "has train.bin but no val.bin"),
    (lambda d: d.mkdir(), dict(), "is a folder with no .txt files and no nanoGPT train.bin/val.bin pair"),
])
def test_bad_data_folders_are_one_line(tmp_path, setup, settings, message):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(UserError, match=message) as err:
        load_splits(DataConfig(path=str(folder), **settings))
    assert str(err.value).startswith("data.path: ") and "\n" not in str(err.value)


def test_a_single_bin_file_or_an_empty_glob_is_refused(tmp_path):
    write_bin_pair(tmp_path, [1, 2], [1, 2])
    with pytest.raises(UserError, match="is a single .bin file; .* give that folder"):
        load_splits(DataConfig(path=str(tmp_path / "train.bin"), tokenizer=None, vocab_size=500))
    with pytest.raises(UserError, match=r"data.path: .*\*.txt matches no files"):
        load_splits(DataConfig(path=str(tmp_path / "*.txt")))


@pytest.mark.parametrize("settings, message", [
    (dict(tokenizer="bpe"), "data.vocab_size must be set above 256 .* with data.tokenizer=bpe"),
    (dict(tokenizer="byte", vocab_size=512), "byte tokenizer has 256 ids; leave it unset"),
    (dict(tokenizer=None), "data.tokenizer=null \\(pre-tokenized uint16 ids\\) needs data.vocab_size"),
    (dict(tokenizer="tok.json", vocab_size=512), "leave it unset with data.tokenizer=tok.json"),
    (dict(tokenizer=""), "data.tokenizer must be byte, bpe, a path to a tokenizer.json or null"),
])
def test_bad_tokenizer_settings_are_refused_at_load(settings, message):
    with pytest.raises(UserError, match=message):
        DataConfig(**settings)


def test_model_vocab_size_follows_the_tokenizer(corpus_file):
    assert load_config("tiny").model.vocab_size == 256
    bpe = ["data.tokenizer=bpe", "data.vocab_size=512", f"data.path={corpus_file}"]
    assert load_config("tiny", bpe).model.vocab_size == 512
    assert load_config("tiny", [*bpe, "model.vocab_size=576"]).model.vocab_size == 576  # padded rows are allowed
    with pytest.raises(UserError, match="model.vocab_size=256 is smaller than the tokenizer's 512 ids"):
        load_config("tiny", [*bpe, "model.vocab_size=256"])
