"""Shared fixtures: the tiny config and a small corpus, with token caches kept inside pytest's tmp dirs."""
import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("SLM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture
def corpus_file(tmp_path):
    """A small plain-text corpus (a user's own file) of about 60 KB."""
    lines = [f"SPEAKER{i % 7}:\nThe quick brown fox {i} jumps over the lazy dog, and so on.\n\n" for i in range(800)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path
