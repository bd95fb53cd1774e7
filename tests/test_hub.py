"""Named models: resolution, cache, checksum."""
from __future__ import annotations

import shutil

import pytest

from realizar import hub


def test_unknown_name_and_missing_file_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REALIZAR_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        hub.resolve(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="realizar pull smollm2-135m"):
        hub.resolve("smollm2-135m")
    with pytest.raises(IsADirectoryError):
        hub.resolve(tmp_path)
    with pytest.raises(hub.PullError, match="unknown model"):
        hub.pull("no-such-model")


def test_cached_model_is_verified_and_reused(tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("REALIZAR_HOME", str(tmp_path))
    dest = hub.cached_path("smollm2-135m")
    dest.parent.mkdir(parents=True)
    shutil.copyfile(model_path, dest)
    before = dest.stat().st_mtime_ns
    assert hub.pull("smollm2-135m", quiet=True) == dest
    assert dest.stat().st_mtime_ns == before  # a good cached copy is not fetched again
    assert hub.resolve("smollm2-135m") == dest
