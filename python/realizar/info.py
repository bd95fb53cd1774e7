"""`realizar info FILE.gguf`: what a GGUF file holds, as a JSON-ready dict or aligned text."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import GGUFError
from .gguf import GGUFFile

# llama.cpp's general.file_type values (enum llama_ftype) that name a whole-model quantization.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    32: "BF16",
}

# name in the report -> key under `<arch>.`
_HPARAMS = {
    "block_count": "block_count",
    "context_length": "context_length",
    "embedding_length": "embedding_length",
    "feed_forward_length": "feed_forward_length",
    "head_count": "attention.head_count",
    "head_count_kv": "attention.head_count_kv",
    "rope_dimension_count": "rope.dimension_count",
    "rope_freq_base": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "vocab_size": "vocab_size",
}


def _plain(v: Any) -> Any:
    """A metadata value as JSON-ready python (numpy arrays become lists, numpy scalars python numbers)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def info_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a GGUF file: architecture, hyper-parameters, tokenizer, tensor types, sizes. Raises GGUFError."""
    with GGUFFile(path) as gf:
        md = gf.metadata
        arch = gf.get_str("general.architecture", default=None)
        hparams: dict[str, Any] = {}
        if arch is not None:
            for name, key in _HPARAMS.items():
                if f"{arch}.{key}" in md:
                    hparams[name] = _plain(md[f"{arch}.{key}"])
        tokens = md.get("tokenizer.ggml.tokens")
        tokenizer = {
            "model": _str_or_none(gf, "tokenizer.ggml.model"),
            "pre": _str_or_none(gf, "tokenizer.ggml.pre"),
            "vocab_size": len(tokens) if tokens is not None else None,
            "n_merges": len(md["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in md else None,
            "bos_token_id": _int_or_none(gf, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _int_or_none(gf, "tokenizer.ggml.eos_token_id"),
            "add_bos_token": _bool_or_none(gf, "tokenizer.ggml.add_bos_token"),
        }
        types: dict[str, dict[str, int]] = {}
        for t in gf.tensors.values():
            entry = types.setdefault(t.type, {"count": 0, "bytes": 0, "parameters": 0})
            entry["count"] += 1
            entry["bytes"] += t.nbytes
            entry["parameters"] += t.n_elements
        file_type = _int_or_none(gf, "general.file_type")
        return {
            "path": gf.path,
            "file_size": gf.file_size,
            "gguf_version": gf.version,
            "architecture": arch,
            "name": _str_or_none(gf, "general.name"),
            "file_type": FILE_TYPES.get(file_type, file_type) if file_type is not None else None,
            "hyperparameters": hparams,
            "tokenizer": tokenizer,
            "has_chat_template": "tokenizer.chat_template" in md,
            "n_metadata": len(md),
            "n_tensors": len(gf.tensors),
            "n_parameters": sum(t.n_elements for t in gf.tensors.values()),
            "tensor_bytes": sum(t.nbytes for t in gf.tensors.values()),
            "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
            "alignment": gf.alignment,
        }


def _str_or_none(gf: GGUFFile, key: str) -> str | None:
    try:
        return gf.get_str(key, default=None)
    except GGUFError:
        return None


def _int_or_none(gf: GGUFFile, key: str) -> int | None:
    try:
        return gf.get_int(key, default=None)
    except GGUFError:
        return None


def _bool_or_none(gf: GGUFFile, key: str) -> bool | None:
    try:
        return gf.get_bool(key, default=None)
    except GGUFError:
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


def info_text(path: str | os.PathLike) -> str:
    """info_dict(path) as human-readable, aligned text."""
    d = info_dict(path)
    rows: list[tuple[str, str]] = [
        ("file", d["path"]),
        ("file size", f"{_size(d['file_size'])} ({d['file_size']} bytes)"),
        ("gguf version", str(d["gguf_version"])),
        ("architecture", _fmt(d["architecture"])),
        ("name", _fmt(d["name"])),
        ("file type", _fmt(d["file_type"])),
        ("parameters", f"{_count(d['n_parameters'])} ({d['n_parameters']})"),
        ("tensors", f"{d['n_tensors']} ({_size(d['tensor_bytes'])})"),
        ("metadata keys", str(d["n_metadata"])),
    ]
    rows += [(name.replace("_", " "), _fmt(v)) for name, v in d["hyperparameters"].items()]
    tok = d["tokenizer"]
    rows += [
        ("tokenizer", _fmt(tok["model"])),
        ("tokenizer pre", _fmt(tok["pre"])),
        ("tokenizer vocab", _fmt(tok["vocab_size"])),
        ("tokenizer merges", _fmt(tok["n_merges"])),
        ("bos / eos ids", f"{_fmt(tok['bos_token_id'])} / {_fmt(tok['eos_token_id'])}"),
        ("add bos", _fmt(tok["add_bos_token"])),
        ("chat template", _fmt(d["has_chat_template"])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if d["tensor_types"]:
        lines.append("")
        header = ("type", "count", "parameters", "size")
        table = [(t, str(e["count"]), _count(e["parameters"]), _size(e["bytes"])) for t, e in d["tensor_types"].items()]
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]
        for r in [header, *table]:
            lines.append(f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True)))
    return "\n".join(lines) + "\n"
