"""`python -m checkpoints.make_fixture --version N --out tests/fixtures/vN_tiny`: a tiny trained run whose
checkpoint is written in format N, so tests can prove that every older format still loads and resumes.

The folder is self-contained: its corpus sits next to the checkpoints and `data.path` says `corpus.txt`, a path
relative to the fixture folder (run from inside it, or re-point it).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from checkpoints.manager import CheckpointStore
from checkpoints.versioning import FORMAT_VERSION
from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.cli import ArgumentParser, main_guard, path_arg
from train.config import load_config
from train.loop import run_training

CORPUS_NAME = "corpus.txt"
OVERRIDES = ("model.d_model=16", "model.seq_len=16", "train.steps=4", "train.batch_size=4", "train.warmup_steps=1",
             "train.log_every=1", "train.eval_batches=2", "train.sample_tokens=0", "checkpoint.every=4",
             "checkpoint.keep=1")


def as_format_1(metadata: dict) -> dict:
    """Metadata exactly as format 1 wrote it: no quant_plan."""
    return {**{k: v for k, v in metadata.items() if k != "quant_plan"}, "format_version": 1}


# format version -> how to write current metadata in that older format (the inverse of its migrations).
OLDER_FORMATS = {1: as_format_1}


def synthetic_corpus(lines: int = 120) -> str:
    """About 5 KB of varied, deterministic text: enough for a train/validation split at seq_len 16."""
    names = ("ALONSO", "BEATRICE", "CLAUDIO", "DOGBERRY")
    verbs = ("sings", "walks", "speaks", "waits", "laughs")
    return "".join(f"{names[i % 4]}:\nThe {verbs[i % 5]} of morning {i} comes over the hill.\n\n" for i in range(lines))


def make_fixture(version: int, out: Path, log=print) -> None:
    if version != FORMAT_VERSION and version not in OLDER_FORMATS:
        raise UserError(f"--version must be one of {sorted({*OLDER_FORMATS, FORMAT_VERSION})}, got {version}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; remove it first")
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / CORPUS_NAME
    corpus.write_text(synthetic_corpus())
    config = load_config("tiny", [f"data.path={corpus.resolve()}", *OVERRIDES])
    with tempfile.TemporaryDirectory() as tmp:
        run_training(config, Path(tmp), log=log)
        trained = CheckpointStore(Path(tmp) / "checkpoints", create=False)
        metadata = trained.metadata()
        state = trained.restore(abstract_state(config, build_model(config)))
        trained.close()
    # Paths inside the fixture are relative to its folder, so it can live in any clone.
    metadata["config"]["data"]["path"] = CORPUS_NAME
    metadata["data"]["source"] = CORPUS_NAME
    if version != FORMAT_VERSION:
        metadata = OLDER_FORMATS[version](metadata)
    store = CheckpointStore(out / "checkpoints", keep=1)
    store.save(metadata["step"], state, metadata)
    store.close()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out}: format {version}, step {metadata['step']}, {size / 1024:.0f} KB")


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m checkpoints.make_fixture", description=__doc__)
    parser.add_argument("--version", type=int, default=FORMAT_VERSION, help="checkpoint format to write")
    parser.add_argument("--out", type=path_arg, required=True, help="a new folder, e.g. tests/fixtures/v2_tiny")
    args = parser.parse_args(argv)
    make_fixture(args.version, args.out)


if __name__ == "__main__":
    main()
