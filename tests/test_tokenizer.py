"""Tokenizers: byte ids pinned and identical through their `tokenizers` JSON, BPE deterministic, any tokenizer.json
used as is, unencodable text refused in one line, and a run's tokenizer read back from its folder alone."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from slm_jax.errors import UserError
from train.tokenizer import (ByteTokenizer, HFTokenizer, NoTokenizer, byte_to_unicode, read_tokenizer_file,
                             run_tokenizer, save_tokenizer, token_dtype, train_bpe)

TEXTS = ["ROMEO:\nBut, soft! what light through yonder window breaks?\n", "Ærø — ça va? 日本語 🎭\n\t\x00\x7f",
         "  two  spaces\r\nand a tab\t"]
CORPUS = "the quick brown fox jumps over the lazy dog. " * 40 + "ROMEO: wherefore art thou Romeo?\n" * 20


def test_byte_ids_are_the_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.encode("ROMEO:").tolist() == [82, 79, 77, 69, 79, 58]
    assert tok.encode("é🎭").tolist() == [0xC3, 0xA9, 0xF0, 0x9F, 0x8E, 0xAD]
    assert tok.encode("\n").dtype == np.uint16 and tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_json_gives_the_same_ids_in_tokenizers(text):
    reference = Tokenizer.from_str(ByteTokenizer().to_json())
    assert reference.get_vocab_size() == 256
    assert reference.encode(text).ids == list(text.encode("utf-8"))
    assert reference.decode(list(text.encode("utf-8"))) == text


def test_byte_alphabet_is_the_one_of_tokenizers_byte_level():
    mapping = byte_to_unicode()
    assert sorted(mapping.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for char in ["\x00", "A", " ", "\x7f", "é", "ÿ", "\u0800", "日", "\U0001F3AD"]:  # 1- to 4-byte UTF-8
        (piece, _), = byte_level.pre_tokenize_str(char)
        assert piece == "".join(mapping[b] for b in char.encode("utf-8"))


def test_bpe_is_deterministic_and_round_trips():
    first, second = train_bpe(CORPUS, 300), train_bpe(CORPUS, 300)
    assert first.to_json() == second.to_json() and first.sha256 == second.sha256
    assert first.vocab_size == 300 and first.describe()["kind"] == "bpe"
    for text in TEXTS:  # all 256 bytes are in the alphabet: unseen characters still encode
        ids = first.encode(text)
        assert ids.dtype == np.uint16 and first.decode(ids) == text
    assert len(first.encode("the quick brown fox")) < len("the quick brown fox") / 2
    assert first.encode(TEXTS[0]).tolist() == Tokenizer.from_str(first.to_json()).encode(TEXTS[0]).ids


def word_level(words: list[str], unk: str | None) -> HFTokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok.to_str())


@pytest.mark.parametrize("tokenizer, good, bad, message", [
    (word_level(["to", "be", "[UNK]"], "[UNK]"), "to be", "to ö be", r"'ö' \(characters 3-4\): it becomes the unknown"),
    (HFTokenizer(Tokenizer(models.BPE({"t": 0, "o": 1, "b": 2, "e": 3}, merges=[])).to_str()), "tobe", "toöbe",
     r"'ö' \(U\+00F6, character 2\): it has no token and no byte fallback")], ids=["unknown-token", "no-byte-fallback"])
def test_text_the_tokenizer_cannot_encode_is_one_line(tokenizer, good, bad, message):
    assert tokenizer.decode(tokenizer.encode(good, source="--prompt")).replace(" ", "") == good.replace(" ", "")
    with pytest.raises(UserError, match=f"^--prompt: the tokenizer cannot encode {message}") as err:
        tokenizer.encode(bad, source="--prompt")
    assert "\n" not in str(err.value)


def test_tokenizer_failures_are_one_line():
    with pytest.raises(UserError, match=r"^text: the tokenizer cannot encode it \(.*Missing \[UNK\] token"):
        word_level(["to", "be"], "[UNK]").encode("to or")  # its unknown token is not in its vocabulary


def test_vocabularies_over_65536_ids_are_uint32():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tok = word_level([f"w{i}" for i in range(70_000)], None)
    ids = tok.encode("w3 w69999 w65536")
    assert ids.dtype == np.uint32 and ids.tolist() == [3, 69999, 65536] and tok.decode(ids) == "w3 w69999 w65536"


def test_a_run_reads_its_tokenizer_back_from_its_folder(tmp_path):
    bpe = train_bpe(CORPUS, 280)
    save_tokenizer(bpe, tmp_path)
    again = run_tokenizer(tmp_path, bpe.describe())
    assert again.to_json() == bpe.to_json() and again.kind == "bpe"
    assert isinstance(run_tokenizer(tmp_path, {}), ByteTokenizer)  # runs from before tokenizers were recorded
    assert isinstance(run_tokenizer(tmp_path, {"kind": "none", "vocab_size": 50304}), NoTokenizer)
    with pytest.raises(UserError, match="not the tokenizer this run was trained with"):
        run_tokenizer(tmp_path, {**bpe.describe(), "sha256": "0" * 64})
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json, but its checkpoints were trained with a bpe"):
        run_tokenizer(tmp_path, bpe.describe())


@pytest.mark.parametrize("content, message", [(None, "is not a tokenizer.json file"),
                                              ("{\"model\": 3}", "is not a valid Hugging Face tokenizer.json")])
def test_bad_tokenizer_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=f"^data.tokenizer: {path} {message}") as err:
        read_tokenizer_file(path)
    assert "\n" not in str(err.value)


def test_pre_tokenized_runs_without_tokenizer_refuse_text():
    with pytest.raises(UserError, match="pre-tokenized ids without a tokenizer"):
        NoTokenizer(50304).encode("hi")
    assert json.loads(json.dumps(NoTokenizer(50304).describe())) == {"kind": "none", "vocab_size": 50304}
