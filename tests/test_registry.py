"""ModelRegistry: the public contract (register, unregister, get, list), metadata, defaults, thread safety."""
from __future__ import annotations

import threading

import pytest

import realizar
from realizar.registry import ModelRegistry, describe_gguf


class Dummy:
    architecture = "llama"
    n_ctx = 2048


def test_register_get_list_unregister():
    reg = realizar.ModelRegistry()
    m = Dummy()
    reg.register("a", m, path="/x/a.gguf")
    assert reg.get("a") is m and reg.get() is m  # the only model is the default
    (info,) = reg.list()
    assert info["id"] == "a" and info["loaded"] is True and info["path"] == "/x/a.gguf"
    assert info["architecture"] == "llama" and info["loaded_at"] > 0
    assert {"id", "architecture", "quantization", "parameters", "context_length", "loaded", "size_bytes"} <= set(info)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", Dummy())
    reg.register("a", Dummy(), replace=True)
    assert reg.get("a") is not m
    reg.unregister("a")
    with pytest.raises(KeyError):
        reg.get("a")
    with pytest.raises(KeyError):
        reg.unregister("a")


def test_default_model_rules():
    reg = ModelRegistry()
    with pytest.raises(KeyError, match="no model"):
        reg.get()
    reg.register("a", Dummy())
    reg.register("b", Dummy())
    with pytest.raises(KeyError, match="several"):
        reg.get()
    reg.default = "b"
    assert reg.get() is reg.get("b")
    reg.unregister("b")
    assert reg.default == "a"  # one left: it is the default again
    with pytest.raises(KeyError):
        reg.default = "zzz"


def test_metadata_dict_and_bad_names():
    reg = ModelRegistry()
    entry = reg.register("m", Dummy(), info={"architecture": "qwen2", "parameters": 7, "unknown_key": 1})
    assert entry.info.architecture == "qwen2" and entry.info.parameters == 7
    for bad in ("", "a/b", "x" * 129, "sp ace"):
        with pytest.raises(ValueError, match="invalid model name"):
            reg.register(bad, Dummy())


def test_reserve_while_loading():
    reg = ModelRegistry()
    reg.reserve("big", "/m/big.gguf")
    assert reg.list() == [{**reg.list()[0], "id": "big", "loaded": False}]
    with pytest.raises(ValueError, match="being loaded"):
        reg.reserve("big")
    assert "big" not in reg and reg.loading() == ["big"]
    reg.register("big", Dummy())
    assert reg.loading() == [] and reg.list()[0]["loaded"] is True
    reg.reserve("other")
    reg.release("other")
    assert reg.loading() == []


def test_concurrent_register_get_unregister():
    reg = ModelRegistry()
    errors = []

    def worker(k: int) -> None:
        try:
            for i in range(200):
                name = f"m{k}-{i % 5}"
                reg.register(name, Dummy(), replace=True)
                assert reg.get(name) is not None
                reg.list()
                reg.unregister(name)
        except Exception as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(reg) == 0


def test_describe_gguf(model_path):
    d = describe_gguf(model_path)
    assert d["architecture"] == "llama" and d["quantization"] == "Q4_1"
    assert d["parameters"] == 134515008 and d["context_length"] == 8192
    assert d["size_bytes"] == model_path.stat().st_size
