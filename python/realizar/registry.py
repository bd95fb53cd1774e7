"""The models a process serves: name -> loaded Model, with its metadata and (in the server) its engine.

Thread-safe: the HTTP loop reads it while loader threads register and unregister. One model is the
default (it needs no `model` field in requests): the only one registered, or the one named by `default`.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelInfo", "ModelEntry", "ModelRegistry", "describe_gguf"]


@dataclass
class ModelInfo:
    """What `GET /models` tells about a model."""

    id: str
    path: str | None = None
    architecture: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    size_bytes: int | None = None
    loaded_at: float | None = None

    def as_dict(self, loaded: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["loaded"] = loaded
        return d


@dataclass
class ModelEntry:
    """A registered model: the Model object, its metadata and, when served, its engine."""

    info: ModelInfo
    model: Any
    engine: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.info.id


def describe_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a GGUF file for ModelInfo (architecture, quantization, parameters, context length, size)."""
    from .info import info_dict

    d = info_dict(path)
    return {
        "path": os.fspath(path),
        "architecture": d.get("architecture"),
        "quantization": d.get("file_type") if isinstance(d.get("file_type"), str) else _dominant_type(d),
        "parameters": d.get("n_parameters"),
        "context_length": d.get("hyperparameters", {}).get("context_length"),
        "size_bytes": d.get("file_size"),
    }


def _dominant_type(d: dict[str, Any]) -> str | None:
    types = d.get("tensor_types") or {}
    return next(iter(types), None)


def _info_from_model(name: str, model: Any, path: str | None) -> ModelInfo:
    """Metadata read from the Model object's attributes, when it has them (any of the usual names)."""

    def attr(*names):
        for n in names:
            v = getattr(model, n, None)
            if v is not None and not callable(v):
                return v
        return None

    return ModelInfo(
        id=name,
        path=path if path is not None else _str_or_none(attr("path")),
        architecture=attr("architecture", "arch"),
        quantization=attr("quantization", "file_type"),
        parameters=attr("parameters", "n_parameters", "num_parameters"),
        context_length=attr("context_length", "n_ctx_train", "n_ctx"),
        size_bytes=attr("size_bytes", "file_size"),
    )


def _str_or_none(v: Any) -> str | None:
    return None if v is None else os.fspath(v)


class ModelRegistry:
    """name -> ModelEntry, safe to use from any thread.

    `register(name, model)`, `unregister(name)`, `get(name)` (the Model) and `list()` (metadata dicts) are the
    public contract; `entry(name)` gives the whole entry (engine included) to the server. Names being loaded can
    be reserved so that two loads of one name cannot race and `list()` can show them as not yet loaded.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, ModelInfo] = {}
        self._default: str | None = None

    # -- the public contract -------------------------------------------------------------------------
    def register(self, name: str, model: Any, *, path: str | os.PathLike | None = None, engine: Any = None,
                 info: ModelInfo | dict[str, Any] | None = None, replace: bool = False) -> ModelEntry:
        """Add `model` under `name`; ValueError if the name is taken (unless replace) or invalid."""
        _check_name(name)
        if isinstance(info, dict):
            info = ModelInfo(id=name, **{k: v for k, v in info.items() if k in ModelInfo.__dataclass_fields__
                                         and k != "id"})
        if info is None:
            info = _info_from_model(name, model, _str_or_none(path))
        info.id = name
        if info.path is None and path is not None:
            info.path = os.fspath(path)
        if info.loaded_at is None:
            info.loaded_at = time.time()
        entry = ModelEntry(info=info, model=model, engine=engine)
        with self._lock:
            if name in self._entries and not replace:
                raise ValueError(f"model {name!r} is already registered")
            self._entries[name] = entry
            self._loading.pop(name, None)
        return entry

    def unregister(self, name: str) -> ModelEntry:
        """Remove and return the entry; KeyError if there is none."""
        with self._lock:
            try:
                entry = self._entries.pop(name)
            except KeyError:
                raise KeyError(f"model {name!r} is not registered") from None
            if self._default == name:
                self._default = None
            return entry

    def get(self, name: str | None = None) -> Any:
        """The Model registered as `name` (None: the default model); KeyError if there is none."""
        return self.entry(name).model

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every model, loaded ones first (sorted by name), then those being loaded."""
        with self._lock:
            loaded = [e.info.as_dict(loaded=True) for _, e in sorted(self._entries.items())]
            loading = [i.as_dict(loaded=False) for _, i in sorted(self._loading.items())]
        return loaded + loading

    # -- for the server ------------------------------------------------------------------------------
    def entry(self, name: str | None = None) -> ModelEntry:
        with self._lock:
            if name is None:
                name = self.default_name()
                if name is None:
                    if not self._entries:
                        raise KeyError("no model is loaded")
                    raise KeyError("several models are loaded: name one with the `model` field")
            try:
                return self._entries[name]
            except KeyError:
                raise KeyError(f"model {name!r} is not loaded") from None

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [e for _, e in sorted(self._entries.items())]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def default_name(self) -> str | None:
        """The model used when a request names none: the explicit default, else the only one registered."""
        with self._lock:
            if self._default is not None and self._default in self._entries:
                return self._default
            if len(self._entries) == 1:
                return next(iter(self._entries))
            return None

    @property
    def default(self) -> str | None:
        return self.default_name()

    @default.setter
    def default(self, name: str | None) -> None:
        with self._lock:
            if name is not None and name not in self._entries:
                raise KeyError(f"model {name!r} is not registered")
            self._default = name

    def reserve(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Mark `name` as being loaded; ValueError if it is registered or already being loaded."""
        _check_name(name)
        with self._lock:
            if name in self._entries:
                raise ValueError(f"model {name!r} is already loaded")
            if name in self._loading:
                raise ValueError(f"model {name!r} is already being loaded")
            self._loading[name] = ModelInfo(id=name, path=_str_or_none(path))

    def release(self, name: str) -> None:
        """Forget a reservation whose load failed."""
        with self._lock:
            self._loading.pop(name, None)

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not set(name) <= _NAME_CHARS:
        raise ValueError(f"invalid model name {name!r}: use 1-128 letters, digits and . _ - :")
