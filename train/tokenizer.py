"""Text <-> token ids for every run: UTF-8 bytes (the default; id = byte value), a byte-level BPE trained with Hugging
Face `tokenizers`, or any `tokenizer.json`. Each kind can be written as a `tokenizers` JSON file, which is what a run
keeps beside its checkpoints and what HF and GGUF exports ship.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slm_jax.errors import UserError
from train.files import replace_file

TOKENIZER_FILE = "tokenizer.json"  # a run's tokenizer, in its workdir beside checkpoints/
KINDS = ("byte", "bpe")  # data.tokenizer: one of these, or a path to a tokenizer.json (kind "file")


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of token ids: uint16 while every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (the one `tokenizers`' ByteLevel pre-tokenizer uses): printable Latin-1 bytes
    stand for themselves, the other 68 bytes for code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def not_unicode(text: str, err: UnicodeEncodeError, source: str) -> UserError:
    """The UserError for `text` holding a lone surrogate (err: its UTF-8 encoding failing): Python's stand-in for a
    command-line byte that is not UTF-8 (U+DC80-U+DCFF, surrogateescape), or an escape such as "\\ud800" in YAML."""
    code = ord(text[err.start])
    what = (f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF else
            f"U+{code:04X}, a lone surrogate, which is no character")
    return UserError(f"{source}: the tokenizer cannot encode character {err.start}: {what} (text must be UTF-8)")


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte value, 256 ids): no vocabulary file, nothing out of vocabulary."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False, source: str = "text") -> np.ndarray:
        """str -> uint16 [n_bytes] (numpy, no `tokenizers` call: this encodes whole corpora fast). Raises UserError
        naming `source` for text that is not Unicode (`not_unicode`)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise not_unicode(text, err, source) from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """ids [n] -> str; invalid UTF-8 (e.g. a sample cut mid-character) becomes U+FFFD."""
        return np.asarray(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same ids in `tokenizers` format: a byte-level BPE without merges whose vocabulary is the 256 bytes."""
        vocab = {char: byte for byte, char in byte_to_unicode().items()}
        return _byte_level(models.BPE(vocab=vocab, merges=[])).to_str()

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class HFTokenizer:
    """A `tokenizers` tokenizer (trained BPE or a user's tokenizer.json), identified by the sha256 of its JSON."""

    def __init__(self, json_text: str, kind: str = "file"):
        self._json, self.kind = json_text, kind
        self._tok = Tokenizer.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        unk = json.loads(json_text).get("model", {}).get("unk_token")
        self._unk_id = self._tok.token_to_id(unk) if unk is not None else None

    def encode(self, text: str, add_special_tokens: bool = False, source: str = "text") -> np.ndarray:
        """str -> ids [n] (uint16 or uint32, see `token_dtype`). Raises UserError naming `source` when a character
        cannot be encoded: it maps to the unknown token, or to no token at all (no byte fallback)."""
        try:
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        except Exception as err:  # e.g. WordLevel without an unknown token: "Missing [UNK] token from the vocabulary"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as bad:  # `tokenizers` only says "TextInputSequence must be str"
                raise not_unicode(text, bad, source) from None
            raise UserError(f"{source}: the tokenizer cannot encode it ({str(err).splitlines()[0]})") from None
        ids = np.asarray(enc.ids, dtype=token_dtype(self.vocab_size))
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        if self._unk_id is not None and (ids == self._unk_id).any():
            start, end = offsets[np.argmax(ids == self._unk_id)]
            raise UserError(f"{source}: the tokenizer cannot encode {text[start:end]!r} (characters {start}-{end}): "
                            f"it becomes the unknown token")
        # A model without byte fallback drops what it has no token for; its offsets then fall short of the text.
        covered = np.zeros(len(text) + 1, np.int32)  # +1 at each token's start, -1 at its end
        np.add.at(covered, offsets[:, 0], 1)
        np.add.at(covered, offsets[:, 1], -1)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        if ((np.cumsum(covered)[:-1] == 0) & ~np.isin(codes, [ord(c) for c in _WHITESPACE])).any():
            lost = next((i for i, c in enumerate(text) if not c.isspace() and not self._tok.encode(c).ids), None)
            what = f"{text[lost]!r} (U+{ord(text[lost]):04X}, character {lost})" if lost is not None else "all of it"
            raise UserError(f"{source}: the tokenizer cannot encode {what}: it has no token and no byte fallback "
                            f"for it")
        return ids

    def decode(self, ids) -> str:
        """ids [n] -> str (special tokens skipped; ids beyond the vocabulary, e.g. padded model rows, ignored)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def to_json(self) -> str:
        return self._json

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256, "file": TOKENIZER_FILE}


_WHITESPACE = " \t\n\r\x0b\x0c\u00a0\u2028\u2029\u3000"  # what pre-tokenizers such as Whitespace may drop


class NoTokenizer:
    """Pre-tokenized ids without a tokenizer (nanoGPT's train.bin/val.bin): no text in or out."""

    kind = "none"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _refuse(self, *_, **__):
        raise UserError("this run was trained on pre-tokenized ids without a tokenizer, so it cannot read or write "
                        "text; train with data.tokenizer=PATH/tokenizer.json (the tokenizer that made the ids)")

    encode = decode = to_json = _refuse

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def train_bpe(text: str, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, all 256 bytes in the alphabet, so any
    text is encodable) trained on `text` with `tokenizers`' BpeTrainer; the same text and size give the same JSON.
    The vocabulary has `vocab_size` ids or fewer when `text` runs out of pairs to merge."""
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return HFTokenizer(tok.to_str(), kind="bpe")


def read_tokenizer_file(path: str | Path, key: str = "data.tokenizer", kind: str = "file") -> HFTokenizer:
    """A Hugging Face `tokenizer.json`; a missing, unreadable or invalid file is a UserError naming `key`."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = f" (nor one of: {', '.join(KINDS)})" if key == "data.tokenizer" else ""
        raise UserError(f"{key}: {path} is not a tokenizer.json file{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: cannot read {path} as UTF-8 text ({err})") from None
    try:
        return HFTokenizer(text, kind)
    except Exception as err:  # tokenizers reports a malformed file as a bare Exception
        raise UserError(f"{key}: {path} is not a valid Hugging Face tokenizer.json "
                        f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None


def save_tokenizer(tokenizer, workdir: Path) -> None:
    """Write `workdir/tokenizer.json` (atomically), so the run can be read without its training data or config
    paths; a run without a tokenizer (kind "none") writes nothing."""
    if tokenizer.kind == "none":
        return
    path = Path(workdir) / TOKENIZER_FILE
    replace_file(path, tokenizer.to_json())


def run_tokenizer(workdir: Path, recorded: dict | None):
    """The tokenizer of the run in `workdir`, from the description its checkpoint metadata recorded (`describe()`):
    bytes for byte runs and runs from before tokenizers were recorded; else `workdir/tokenizer.json`, which must
    match the recorded sha256. Raises UserError when that file is missing or differs."""
    recorded = recorded or {}
    kind = recorded.get("kind", "byte")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "none":
        return NoTokenizer(recorded["vocab_size"])
    path = Path(workdir) / recorded.get("file", TOKENIZER_FILE)
    if not path.is_file():
        raise UserError(f"{workdir} has no {path.name}, but its checkpoints were trained with a {kind} tokenizer "
                        f"(sha256 {recorded.get('sha256', '?')[:12]}); copy that file back into the run folder")
    tokenizer = read_tokenizer_file(path, key=str(path), kind=kind)
    if tokenizer.sha256 != recorded.get("sha256"):
        raise UserError(f"{path} is not the tokenizer this run was trained with (sha256 {tokenizer.sha256[:12]}, "
                        f"checkpoints record {recorded.get('sha256', '?')[:12]})")
    return tokenizer
