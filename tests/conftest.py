"""Shared fixtures: the real SmolLM2 model file and the llama.cpp reference outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "smollm2-llamacpp.json"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_model(filename: str = MODEL_FILENAME) -> Path | None:
    """The test model: $REALIZAR_TEST_MODEL, the realizar cache, /tmp/models or /tmp/anchor/models."""
    env = os.environ.get("REALIZAR_TEST_MODEL")
    if env and filename == MODEL_FILENAME:
        return Path(env) if Path(env).exists() else None
    home = Path(os.environ.get("REALIZAR_HOME") or Path.home() / ".cache" / "realizar")
    for folder in (home / "models", Path("/tmp/models"), Path("/tmp/anchor/models")):
        if (folder / filename).exists():
            return folder / filename
    return None


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = find_model()
    if path is None:
        pytest.skip(f"{MODEL_FILENAME} not found (run `realizar pull smollm2-135m`)")
    return path


@pytest.fixture(scope="session")
def reference() -> dict:
    path = REFERENCE.resolve()
    if not path.exists():
        pytest.skip(f"llama.cpp reference outputs not found at {path}")
    return json.loads(path.read_text())
