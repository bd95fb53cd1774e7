"""GGUF v2/v3 reader (hardened, memory-mapped, zero-copy) and v3 writer.

Layout (all little-endian):
    header   magic b"GGUF", version u32, n_tensors u64, n_kv u64
    kv       n_kv × (key: string, value type u32, value)
    infos    n_tensors × (name: string, n_dims u32, dims u64 × n_dims (innermost first), type u32, offset u64)
    padding  up to `general.alignment` (default 32)
    data     tensors at their offsets (relative to the data region, each a multiple of the alignment)
where string = length u64 + UTF-8 bytes and array = element type u32 + count u64 + elements.

A model file is untrusted input: every length, count and offset is checked against the bytes actually present
before it is used, and every problem raises GGUFError with a message that starts with the file path.

Caps and choices (the reasons are in the comments next to each constant):
  * at most MAX_TENSORS tensors and MAX_KV metadata pairs, and never more than the remaining bytes could hold;
  * general.alignment must be a uint32 power of two in [1, MAX_ALIGNMENT];
  * tensors have 1..MAX_DIMS dimensions, each >= 1; element counts and byte sizes must stay below 2**63;
  * the innermost dimension must be a multiple of the type's block size; tensor data must lie inside the file,
    start at an aligned offset and not overlap another tensor;
  * keys and tensor names must be non-empty valid UTF-8; duplicate keys or tensor names are errors;
  * string values are decoded with errors='replace', except those under `tokenizer.ggml.` (tokens, merges...),
    decoded with 'surrogateescape' so that vocabularies holding byte fragments that are not valid UTF-8 lose
    nothing (the writer encodes with 'surrogateescape' too, so they round-trip);
  * tokenizer.ggml.tokens / merges must be arrays of strings, scores of float32, token_type of int32,
    precompiled_charsmap of uint8 or int8, and scores / token_type must have as many entries as tokens;
  * when general.architecture and `<arch>.block_count` are present, block_count must be an integer in
    [0, MAX_LAYERS], no `blk.{i}.` tensor may have i >= block_count and, unless the file holds no tensors at
    all (a vocabulary-only file), every layer i < block_count must have at least one `blk.{i}.` tensor.
"""
from __future__ import annotations

import enum
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GGUFError
from .types import BLOCK_LAYOUT, GGMLType, ggml_type

__all__ = [
    "GGUF_MAGIC",
    "GGUFValueType",
    "GGUFFile",
    "GGUFWriter",
    "Tensor",
    "MAX_TENSORS",
    "MAX_KV",
    "MAX_ALIGNMENT",
    "MAX_DIMS",
    "MAX_LAYERS",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Real models hold a few thousand tensors and well under a thousand keys; a million of either is a forged count.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
# ggml never needs more than a page; 1 MiB leaves room for huge-page experiments and bounds the padding.
MAX_ALIGNMENT = 1 << 20
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
# The largest published models have ~130 layers; 1024 bounds per-layer allocations done from block_count.
MAX_LAYERS = 1024
# Nested arrays are legal but unused by real models; a bound keeps recursion shallow.
MAX_ARRAY_DEPTH = 8
# llama.cpp rejects tensor names of 64 bytes or more (GGML_MAX_NAME); keys have no such limit, so be generous.
MAX_NAME_BYTES = 1024
MAX_KEY_BYTES = 65536

_INT64_LIMIT = 1 << 63


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12

    @classmethod
    def of(cls, t: GGUFValueType | str | int) -> GGUFValueType:
        """Accept GGUFValueType.FLOAT32, 'float32', 'FLOAT32' or 6."""
        if isinstance(t, GGUFValueType):
            return t
        if isinstance(t, str):
            try:
                return cls[t.upper()]
            except KeyError:
                raise ValueError(f"unknown GGUF value type {t!r}") from None
        return cls(int(t))


_V = GGUFValueType
# Scalar types with a fixed size: struct code (little-endian) and numpy dtype of an array of them.
_FIXED: dict[GGUFValueType, tuple[str, np.dtype]] = {
    _V.UINT8: ("<B", np.dtype("<u1")),
    _V.INT8: ("<b", np.dtype("<i1")),
    _V.UINT16: ("<H", np.dtype("<u2")),
    _V.INT16: ("<h", np.dtype("<i2")),
    _V.UINT32: ("<I", np.dtype("<u4")),
    _V.INT32: ("<i", np.dtype("<i4")),
    _V.FLOAT32: ("<f", np.dtype("<f4")),
    _V.BOOL: ("<B", np.dtype("<u1")),
    _V.UINT64: ("<Q", np.dtype("<u8")),
    _V.INT64: ("<q", np.dtype("<i8")),
    _V.FLOAT64: ("<d", np.dtype("<f8")),
}
_STRUCTS = {t: struct.Struct(code) for t, (code, _) in _FIXED.items()}
_INT_TYPES = frozenset({_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64})
_FLOAT_TYPES = frozenset({_V.FLOAT32, _V.FLOAT64})
_INT_RANGES = {
    _V.UINT8: (0, 1 << 8), _V.INT8: (-(1 << 7), 1 << 7),
    _V.UINT16: (0, 1 << 16), _V.INT16: (-(1 << 15), 1 << 15),
    _V.UINT32: (0, 1 << 32), _V.INT32: (-(1 << 31), 1 << 31),
    _V.UINT64: (0, 1 << 64), _V.INT64: (-(1 << 63), 1 << 63),
}
# Smallest encoded size of one array element, used to bound counts by the bytes left.
_MIN_ELEM_BYTES = {**{t: s.size for t, s in _STRUCTS.items()}, _V.STRING: 8, _V.ARRAY: 12}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

# Smallest key/value pair: key length, value type, a 1-byte value (an empty key is reported as such later).
_MIN_KV_BYTES = 8 + 4 + 1
# Smallest tensor info: name length, n_dims, one dim, type, offset.
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8

# key -> element types its array may have (checked at open time: llama.cpp's tokenizer CVEs).
TOKENIZER_ARRAY_TYPES: dict[str, tuple[GGUFValueType, ...]] = {
    "tokenizer.ggml.tokens": (_V.STRING,),
    "tokenizer.ggml.scores": (_V.FLOAT32,),
    "tokenizer.ggml.token_type": (_V.INT32,),
    "tokenizer.ggml.merges": (_V.STRING,),
    "tokenizer.ggml.precompiled_charsmap": (_V.UINT8, _V.INT8),
}

_BLK_RE = re.compile(r"blk\.(\d+)\.")
_MISSING: Any = object()


def _align_up(x: int, alignment: int) -> int:
    return (x + alignment - 1) // alignment * alignment


@dataclass(frozen=True, eq=False)
class Tensor:
    """One tensor of a GGUF file. `shape` is in numpy order (GGUF stores dims innermost first)."""

    name: str
    type_id: GGMLType
    shape: tuple[int, ...]
    n_elements: int
    nbytes: int
    offset: int  # absolute file offset of the first byte
    _file: GGUFFile | None = field(default=None, repr=False)

    @property
    def type(self) -> str:
        return self.type_id.name

    @property
    def data(self) -> np.ndarray:
        """Read-only uint8 view of the tensor's bytes in the memory map (no copy)."""
        if self._file is None:
            raise GGUFError(f"tensor {self.name} is not backed by a file")
        return self._file._view(self)

    def as_array(self) -> np.ndarray:
        """Zero-copy typed view: F32/F16 as float arrays of `shape`, BF16 as uint16 of `shape`, block types as
        uint8 of shape[:-1] + (bytes per row,)."""
        data = self.data
        if self.type_id == GGMLType.F32:
            return data.view("<f4").reshape(self.shape)
        if self.type_id == GGMLType.F16:
            return data.view("<f2").reshape(self.shape)
        if self.type_id == GGMLType.BF16:
            return data.view("<u2").reshape(self.shape)
        rows = self.n_elements // self.shape[-1]
        return data.reshape(self.shape[:-1] + (self.nbytes // rows,))


class _Parser:
    """Bounds-checked cursor over the memory map; every failure becomes a GGUFError naming the file."""

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> int:
        pos = self.pos
        if n > self.size - pos:
            raise self.fail(f"truncated file: {what} needs {n} bytes at offset {pos} but the file has {self.size}")
        self.pos = pos + n
        return pos

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what}: string length {n} at offset {self.pos - 8} runs past end of file "
                            f"(file {self.size})")
        start = self.need(n, what)
        return self.buf[start:start + n]

    def name(self, what: str, limit: int) -> str:
        start = self.pos
        raw = self.raw_string(what)
        if not raw:
            raise self.fail(f"empty {what} at offset {start}")
        if len(raw) > limit:
            raise self.fail(f"{what} at offset {start} is {len(raw)} bytes long (limit {limit})")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start} is not valid UTF-8: {raw[:64]!r}") from None

    def value_type(self, what: str) -> GGUFValueType:
        start = self.pos
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {t} at offset {start}") from None

    def value(self, vtype: GGUFValueType, key: str, errors: str, depth: int = 0) -> Any:
        if vtype == _V.STRING:
            return self.raw_string(f"value of {key}").decode("utf-8", errors)
        if vtype == _V.ARRAY:
            return self.array(key, errors, depth)
        s = _STRUCTS[vtype]
        v = s.unpack_from(self.buf, self.need(s.size, f"value of {key}"))[0]
        if vtype == _V.BOOL:
            if v > 1:
                raise self.fail(f"{key}: invalid bool value {v}")
            return bool(v)
        return v

    def array(self, key: str, errors: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.value_type(f"array element type of {key}")
        start = self.pos
        count = self.u64(f"array length of {key}")
        left = self.size - self.pos
        if count > left // _MIN_ELEM_BYTES[etype]:
            raise self.fail(f"{key}: array of {count} {etype.name.lower()} at offset {start} runs past end of file "
                            f"({left} bytes left)")
        if etype == _V.STRING:
            return self.string_array(count, key, errors)
        if etype == _V.ARRAY:
            return [self.array(key, errors, depth + 1) for _ in range(count)]
        dtype = _FIXED[etype][1]
        pos = self.need(count * dtype.itemsize, f"array {key}")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=pos).astype(dtype.newbyteorder("="))
        if etype == _V.BOOL:
            if count and arr.max() > 1:
                raise self.fail(f"{key}: invalid bool value {int(arr.max())} in array")
            arr = arr.view(np.bool_)
        return arr

    def string_array(self, count: int, key: str, errors: str) -> list[str]:
        # The hot loop of opening a model (≈100k vocabulary entries): locals only, one bounds check per string.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        try:
            for i in range(count):
                if pos + 8 > size:
                    raise self.fail(f"truncated file: {key}[{i}] length at offset {pos} (file {size})")
                n = unpack(buf, pos)[0]
                pos += 8
                end = pos + n
                if end > size:
                    raise self.fail(f"{key}[{i}]: string length {n} at offset {pos - 8} runs past end of file "
                                    f"(file {size})")
                out[i] = buf[pos:end].decode("utf-8", errors)
                pos = end
        finally:
            self.pos = pos
        return out


class GGUFFile:
    """A GGUF v2/v3 file, memory-mapped read-only. Raises GGUFError on any malformed or unsupported file.

    Tensor views (`tensor.data`) are zero-copy; those taken keep the mapping alive even after close().
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, GGUFValueType] = {}  # key -> value type
        self.array_types: dict[str, GGUFValueType] = {}  # key of an array -> its element type
        self.tensors: dict[str, Tensor] = {}
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                self._check_header(f.read(_HEADER.size))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.file_size = len(self._mm)  # what is mapped is what gets checked
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from e
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------------------------------------

    def _check_header(self, head: bytes) -> None:
        """Magic, version and header size, checked before mapping the file."""
        if len(head) < 4:
            raise GGUFError(f"{self.path}: truncated file: {len(head)} bytes, too short for a GGUF header")
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
        if len(head) >= 8:
            version = _U32.unpack_from(head, 4)[0]
            if version not in SUPPORTED_VERSIONS:
                if struct.unpack("<I", struct.pack(">I", version))[0] in (1, 2, 3):
                    raise GGUFError(f"{self.path}: big-endian GGUF files are not supported")
                if version == 1:
                    raise GGUFError(f"{self.path}: GGUF version 1 is not supported (only versions 2 and 3)")
                raise GGUFError(f"{self.path}: unsupported GGUF version {version} (only versions 2 and 3)")
        if len(head) < _HEADER.size:
            raise GGUFError(f"{self.path}: truncated file: {len(head)} bytes, too short for the "
                            f"{_HEADER.size}-byte GGUF header")

    def _parse(self) -> None:
        p = _Parser(self.path, self._mm, self.file_size)
        _, self.version, n_tensors, n_kv = _HEADER.unpack_from(self._mm, 0)
        p.pos = _HEADER.size
        left = self.file_size - p.pos
        if n_kv > MAX_KV or n_kv > left // _MIN_KV_BYTES:
            raise p.fail(f"metadata count {n_kv} is absurd (limit {MAX_KV}, {left} bytes left in the file)")
        if n_tensors > MAX_TENSORS or n_tensors > left // _MIN_TENSOR_INFO_BYTES:
            raise p.fail(f"tensor count {n_tensors} is absurd (limit {MAX_TENSORS}, {left} bytes left in the file)")

        for _ in range(n_kv):
            key = p.name("metadata key", MAX_KEY_BYTES)
            if key in self.metadata:
                raise p.fail(f"duplicate metadata key {key!r}")
            vtype = p.value_type(f"value type of {key}")
            start = p.pos
            errors = "surrogateescape" if key.startswith("tokenizer.ggml.") else "replace"
            self.metadata[key] = p.value(vtype, key, errors)
            self.types[key] = vtype
            if vtype == _V.ARRAY:  # the element type leads the array and was validated by p.value
                self.array_types[key] = GGUFValueType(_U32.unpack_from(self._mm, start)[0])

        self.alignment = self._alignment(p)
        infos = []
        names: set[str] = set()
        for _ in range(n_tensors):
            info = self._tensor_info(p)
            if info[0] in names:
                raise p.fail(f"duplicate tensor name {info[0]!r}")
            names.add(info[0])
            infos.append(info)
        self.data_offset = _align_up(p.pos, self.alignment)
        for name, dims, ttype, rel in infos:
            self.tensors[name] = self._tensor(p, name, dims, ttype, rel)
        self._check_overlaps(p)
        self._check_tokenizer(p)
        self._check_layers(p)

    def _alignment(self, p: _Parser) -> int:
        key = "general.alignment"
        if key not in self.metadata:
            return DEFAULT_ALIGNMENT
        if self.types[key] != _V.UINT32:
            raise p.fail(f"{key} must be a uint32, not {self.types[key].name.lower()}")
        a = self.metadata[key]
        if a < 1 or a & (a - 1):
            raise p.fail(f"{key} {a} is not a power of two")
        if a > MAX_ALIGNMENT:
            raise p.fail(f"{key} {a} is larger than the limit {MAX_ALIGNMENT}")
        return a

    def _tensor_info(self, p: _Parser) -> tuple[str, list[int], int, int]:
        name = p.name("tensor name", MAX_NAME_BYTES)
        n_dims = p.u32(f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise p.fail(f"tensor {name} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
        dims = [p.u64(f"dimensions of tensor {name}") for _ in range(n_dims)]
        ttype = p.u32(f"type of tensor {name}")
        rel = p.u64(f"offset of tensor {name}")
        return name, dims, ttype, rel

    def _tensor(self, p: _Parser, name: str, dims: list[int], ttype: int, rel: int) -> Tensor:
        try:
            t = GGMLType(ttype)
            block, block_bytes = BLOCK_LAYOUT[t]
        except (ValueError, KeyError):
            raise p.fail(f"tensor {name} has unknown type {ttype}") from None
        shape = tuple(reversed(dims))
        n = 1
        for d in dims:
            if d == 0 or d >= _INT64_LIMIT:
                raise p.fail(f"tensor {name} has invalid dimension {d} (shape {list(shape)})")
            n *= d
            if n >= _INT64_LIMIT:
                raise p.fail(f"tensor {name}: element count of shape {list(shape)} overflows 64 bits")
        if dims[0] % block:
            raise p.fail(f"tensor {name} ({t.name}): innermost dimension {dims[0]} is not a multiple of the "
                         f"block size {block}")
        nbytes = n // block * block_bytes
        if nbytes >= _INT64_LIMIT:
            raise p.fail(f"tensor {name}: byte size of shape {list(shape)} overflows 64 bits")
        if rel % self.alignment:
            raise p.fail(f"tensor {name}: offset {rel} is not a multiple of the alignment {self.alignment}")
        offset = self.data_offset + rel
        if offset + nbytes > self.file_size:
            raise p.fail(f"tensor {name} extends past end of file (offset {offset}, size {nbytes}, "
                         f"file {self.file_size})")
        return Tensor(name, t, shape, n, nbytes, offset, self)

    def _check_overlaps(self, p: _Parser) -> None:
        prev: Tensor | None = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise p.fail(f"tensor {t.name} (offset {t.offset}) overlaps tensor {prev.name} "
                             f"(offset {prev.offset}, size {prev.nbytes})")
            prev = t

    def _check_tokenizer(self, p: _Parser) -> None:
        for key, etypes in TOKENIZER_ARRAY_TYPES.items():
            if key not in self.metadata:
                continue
            if self.types[key] != _V.ARRAY or self.array_types.get(key) not in etypes:
                expected = " or ".join(t.name.lower() for t in etypes)
                raise p.fail(f"{key} must be an array of {expected}, not {self._type_name(key)}")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            return
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if key in self.metadata and len(self.metadata[key]) != len(tokens):
                raise p.fail(f"{key} has {len(self.metadata[key])} entries but tokenizer.ggml.tokens has "
                             f"{len(tokens)}")

    def _check_layers(self, p: _Parser) -> None:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            return
        if self.types["general.architecture"] != _V.STRING:
            raise p.fail(f"general.architecture must be a string, not {self._type_name('general.architecture')}")
        key = f"{arch}.block_count"
        if key not in self.metadata:
            return
        if self.types[key] not in _INT_TYPES:
            raise p.fail(f"{key} must be an integer, not {self._type_name(key)}")
        n_layers = self.metadata[key]
        if not 0 <= n_layers <= MAX_LAYERS:
            raise p.fail(f"{key} {n_layers} is out of range (0 to {MAX_LAYERS})")
        present = set()
        for name in self.tensors:
            m = _BLK_RE.match(name)
            if m:
                i = int(m.group(1))
                if i >= n_layers:
                    raise p.fail(f"tensor {name} belongs to layer {i} but {key} is {n_layers}")
                present.add(i)
        if self.tensors:
            missing = [i for i in range(n_layers) if i not in present]
            if missing:
                raise p.fail(f"{key} is {n_layers} but layer {missing[0]} has no blk.{missing[0]}.* tensors "
                             f"({len(missing)} layers missing)")

    def _type_name(self, key: str) -> str:
        t = self.types[key]
        if t == _V.ARRAY:
            et = self.array_types.get(key)
            return f"array of {et.name.lower()}" if et is not None else "array"
        return t.name.lower()

    # -- access -------------------------------------------------------------------------------------------

    def _view(self, t: Tensor) -> np.ndarray:
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed (tensor {t.name})")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    @property
    def architecture(self) -> str | None:
        return self.get_str("general.architecture", default=None)

    def _get(self, key: str, default: Any, ok: Callable[[GGUFValueType], bool], expected: str) -> Any:
        if key not in self.metadata:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: missing metadata key {key!r}")
            return default
        if not ok(self.types[key]):
            raise GGUFError(f"{self.path}: metadata key {key!r} is {self._type_name(key)}, expected {expected}")
        return self.metadata[key]

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        return self._get(key, default, lambda t: t in _INT_TYPES, "an integer")

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        v = self._get(key, default, lambda t: t in _FLOAT_TYPES or t in _INT_TYPES, "a float")
        return float(v) if key in self.metadata else v

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        return self._get(key, default, lambda t: t == _V.STRING, "a string")

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._get(key, default, lambda t: t == _V.BOOL, "a bool")

    def get_array(self, key: str, elem_type: GGUFValueType | str | Iterable | None = None,
                  default: Any = _MISSING) -> Any:
        """The array under `key` (numpy array for numbers and bools, list for strings and nested arrays).
        `elem_type` (a type, a name like 'float32', or several of them) restricts the element type."""
        if elem_type is None:
            allowed = None
        elif isinstance(elem_type, (GGUFValueType, str, int)):
            allowed = {GGUFValueType.of(elem_type)}
        else:
            allowed = {GGUFValueType.of(e) for e in elem_type}
        expected = "an array" if allowed is None else \
            "an array of " + " or ".join(sorted(e.name.lower() for e in allowed))
        return self._get(key, default,
                         lambda t: t == _V.ARRAY and (allowed is None or self.array_types.get(key) in allowed),
                         expected)

    def close(self) -> None:
        """Release the mapping. Views already taken stay valid: the mapping is then freed with the last one."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported views still alive; the mmap object unmaps when they are gone

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={getattr(self, 'version', None)}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


# ------------------------------------------------------------------------------------------------------------
# Writer


# Keys whose type llama.cpp checks strictly: an int given without a type is written with the type it expects.
_KNOWN_KEY_TYPES: dict[str, GGUFValueType] = {
    "general.alignment": _V.UINT32,
    "general.file_type": _V.UINT32,
    "general.quantization_version": _V.UINT32,
    "tokenizer.ggml.bos_token_id": _V.UINT32,
    "tokenizer.ggml.eos_token_id": _V.UINT32,
    "tokenizer.ggml.eot_token_id": _V.UINT32,
    "tokenizer.ggml.unknown_token_id": _V.UINT32,
    "tokenizer.ggml.seperator_token_id": _V.UINT32,
    "tokenizer.ggml.padding_token_id": _V.UINT32,
}
_KNOWN_SUFFIX_TYPES: dict[str, GGUFValueType] = {
    ".block_count": _V.UINT32,
    ".context_length": _V.UINT32,
    ".embedding_length": _V.UINT32,
    ".feed_forward_length": _V.UINT32,
    ".vocab_size": _V.UINT32,
    ".attention.head_count": _V.UINT32,
    ".attention.head_count_kv": _V.UINT32,
    ".attention.key_length": _V.UINT32,
    ".attention.value_length": _V.UINT32,
    ".rope.dimension_count": _V.UINT32,
    ".expert_count": _V.UINT32,
    ".expert_used_count": _V.UINT32,
    ".rope.freq_base": _V.FLOAT32,
    ".rope.scaling.factor": _V.FLOAT32,
    ".attention.layer_norm_rms_epsilon": _V.FLOAT32,
    ".attention.layer_norm_epsilon": _V.FLOAT32,
}

_DTYPE_TO_VALUE_TYPE = {
    np.dtype(np.uint8): _V.UINT8, np.dtype(np.int8): _V.INT8,
    np.dtype(np.uint16): _V.UINT16, np.dtype(np.int16): _V.INT16,
    np.dtype(np.uint32): _V.UINT32, np.dtype(np.int32): _V.INT32,
    np.dtype(np.uint64): _V.UINT64, np.dtype(np.int64): _V.INT64,
    np.dtype(np.float32): _V.FLOAT32, np.dtype(np.float64): _V.FLOAT64,
    np.dtype(np.bool_): _V.BOOL,
}


def _known_type(key: str) -> GGUFValueType | None:
    if key in _KNOWN_KEY_TYPES:
        return _KNOWN_KEY_TYPES[key]
    for suffix, t in _KNOWN_SUFFIX_TYPES.items():
        if key.endswith(suffix):
            return t
    return None


def _int_type(lo: int, hi: int) -> GGUFValueType:
    for t in (_V.INT32, _V.UINT32, _V.INT64, _V.UINT64):
        a, b = _INT_RANGES[t]
        if a <= lo and hi < b:
            return t
    raise ValueError(f"integer {lo if lo < 0 else hi} does not fit in 64 bits")


def _infer_type(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return _V.BOOL
    if isinstance(value, (int, np.integer)):
        if isinstance(value, np.integer):
            return _DTYPE_TO_VALUE_TYPE[np.dtype(type(value))]
        return _int_type(value, value)
    if isinstance(value, np.floating):
        return _V.FLOAT64 if value.dtype == np.float64 else _V.FLOAT32
    if isinstance(value, float):
        return _V.FLOAT32
    if isinstance(value, str):
        return _V.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return _V.ARRAY
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _infer_elem_type(values: Any) -> GGUFValueType:
    if isinstance(values, np.ndarray):
        if values.dtype in _DTYPE_TO_VALUE_TYPE:
            return _DTYPE_TO_VALUE_TYPE[values.dtype]
        if values.dtype.kind in "US":
            return _V.STRING
        raise TypeError(f"cannot store a numpy array of {values.dtype} in GGUF metadata")
    if len(values) == 0:
        raise ValueError("cannot infer the element type of an empty array; pass elem_type")
    kinds = {_infer_type(v) for v in values}
    if kinds <= {_V.INT32, _V.UINT32, _V.INT64, _V.UINT64} and all(isinstance(v, int) for v in values):
        return _int_type(min(values), max(values))
    if kinds <= {_V.FLOAT32, _V.FLOAT64, _V.INT32, _V.UINT32, _V.INT64} and _V.FLOAT32 in kinds:
        return _V.FLOAT32
    if len(kinds) == 1:
        return kinds.pop()
    raise TypeError(f"array mixes element types {sorted(k.name.lower() for k in kinds)}")


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogateescape")
    return _U64.pack(len(raw)) + raw


def _encode_scalar(t: GGUFValueType, v: Any, key: str) -> bytes:
    if t == _V.STRING:
        if not isinstance(v, str):
            raise TypeError(f"{key}: expected a str, got {type(v).__name__}")
        return _encode_string(v)
    if t == _V.BOOL:
        return b"\x01" if v else b"\x00"
    if t in _INT_TYPES:
        if isinstance(v, (bool, float, np.floating)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{key}: expected an integer for {t.name.lower()}, got {v!r}")
        lo, hi = _INT_RANGES[t]
        if not lo <= int(v) < hi:
            raise ValueError(f"{key}: {v} does not fit in {t.name.lower()}")
        return _STRUCTS[t].pack(int(v))
    return _STRUCTS[t].pack(float(v))


def _encode_array(values: Any, elem_type: GGUFValueType | None, key: str) -> bytes:
    et = GGUFValueType.of(elem_type) if elem_type is not None else _infer_elem_type(values)
    head = _U32.pack(et) + _U64.pack(len(values))
    if et == _V.STRING:
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"{key}: expected only str in an array of string")
        return head + b"".join(_encode_string(v) for v in values)
    if et == _V.ARRAY:
        return head + b"".join(_encode_array(v, None, key) for v in values)
    if et == _V.BOOL:
        arr = np.asarray(values, dtype=np.bool_)
        return head + arr.astype(np.uint8).tobytes()
    dtype = _FIXED[et][1]
    arr = np.asarray(values)
    if et in _INT_TYPES:
        if arr.size and arr.dtype.kind not in "iub":
            raise TypeError(f"{key}: expected integers for an array of {et.name.lower()}")
        lo, hi = _INT_RANGES[et]
        if arr.size and (int(arr.min()) < lo or int(arr.max()) >= hi):
            raise ValueError(f"{key}: values do not fit in {et.name.lower()}")
    return head + arr.astype(dtype).tobytes()


@dataclass
class _PendingTensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]
    nbytes: int
    source: np.ndarray | Callable[[], np.ndarray]


class GGUFWriter:
    """Write a GGUF v3 file.

        with GGUFWriter("out.gguf", arch="llama") as w:
            w.add("llama.block_count", 30)
            w.add_tensor("token_embd.weight", q_bytes, "Q4_K", shape=(49152, 576))

    Tensor data may be an array or a callable returning one: callables are invoked one at a time during
    write(), so a quantizer can stream a model without holding every quantized tensor in memory.
    """

    def __init__(self, path: str | os.PathLike, arch: str | None = None, alignment: int = DEFAULT_ALIGNMENT):
        if not (isinstance(alignment, int) and 1 <= alignment <= MAX_ALIGNMENT and alignment & (alignment - 1) == 0):
            raise ValueError(f"alignment {alignment!r} must be a power of two in [1, {MAX_ALIGNMENT}]")
        self.path = os.fspath(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _PendingTensor] = {}
        self._written = False
        if arch is not None:
            self.add_string("general.architecture", arch)
        if alignment != DEFAULT_ALIGNMENT:
            self.add_uint32("general.alignment", alignment)

    # -- metadata -----------------------------------------------------------------------------------------

    def add(self, key: str, value: Any, type: GGUFValueType | str | None = None,
            elem_type: GGUFValueType | str | None = None) -> None:
        """Add a key; the value type is `type`, else the type llama.cpp expects for a well-known key, else
        inferred (bool, int -> int32/uint32/int64/uint64 by range, float -> float32, str, list/array)."""
        if not key:
            raise ValueError("empty metadata key")
        if key in self._kv:
            raise ValueError(f"duplicate metadata key {key!r}")
        if type is not None:
            t = GGUFValueType.of(type)
        else:
            t = _infer_type(value)
            known = _known_type(key)
            if known is not None and t != _V.ARRAY and t != _V.STRING and t != _V.BOOL:
                t = known
        if t == _V.ARRAY:
            payload = _encode_array(value, elem_type, key)
        else:
            payload = _encode_scalar(t, value, key)
        if key == "general.alignment" and (t != _V.UINT32 or value != self.alignment):
            raise ValueError("set general.alignment through GGUFWriter(alignment=...)")
        self._kv[key] = _encode_string(key) + _U32.pack(t) + payload

    def add_array(self, key: str, values: Any, elem_type: GGUFValueType | str | None = None) -> None:
        self.add(key, values, _V.ARRAY, elem_type)

    def add_uint8(self, key: str, v: int) -> None:
        self.add(key, v, _V.UINT8)

    def add_int8(self, key: str, v: int) -> None:
        self.add(key, v, _V.INT8)

    def add_uint16(self, key: str, v: int) -> None:
        self.add(key, v, _V.UINT16)

    def add_int16(self, key: str, v: int) -> None:
        self.add(key, v, _V.INT16)

    def add_uint32(self, key: str, v: int) -> None:
        self.add(key, v, _V.UINT32)

    def add_int32(self, key: str, v: int) -> None:
        self.add(key, v, _V.INT32)

    def add_uint64(self, key: str, v: int) -> None:
        self.add(key, v, _V.UINT64)

    def add_int64(self, key: str, v: int) -> None:
        self.add(key, v, _V.INT64)

    def add_float32(self, key: str, v: float) -> None:
        self.add(key, v, _V.FLOAT32)

    def add_float64(self, key: str, v: float) -> None:
        self.add(key, v, _V.FLOAT64)

    def add_bool(self, key: str, v: bool) -> None:
        self.add(key, v, _V.BOOL)

    def add_string(self, key: str, v: str) -> None:
        self.add(key, v, _V.STRING)

    # -- tensors ------------------------------------------------------------------------------------------

    def add_tensor(self, name: str, data: np.ndarray | Callable[[], np.ndarray],
                   type: GGMLType | str | int | None = None, shape: Iterable[int] | None = None) -> None:
        """Add a tensor. `shape` is in numpy order (outermost first). `data` is float32/float16 values (type
        defaults from the dtype, shape from the array) or the raw bytes of any type (then type and shape are
        required), or a callable returning either, called during write()."""
        if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        if callable(data) and not isinstance(data, np.ndarray):
            if type is None or shape is None:
                raise ValueError(f"tensor {name}: type and shape are required when data is a callable")
        else:
            data = np.asarray(data)
            if type is None:
                if data.dtype == np.float32:
                    type = GGMLType.F32
                elif data.dtype == np.float16:
                    type = GGMLType.F16
                else:
                    raise ValueError(f"tensor {name}: type is required for data of dtype {data.dtype}")
            if shape is None:
                if data.dtype == np.uint8 and ggml_type(type) not in (GGMLType.F32, GGMLType.F16):
                    raise ValueError(f"tensor {name}: shape is required for raw bytes")
                shape = data.shape
        t = ggml_type(type)
        if t not in BLOCK_LAYOUT:
            raise ValueError(f"tensor {name}: unsupported type {t.name}")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= MAX_DIMS or any(d < 1 for d in shape):
            raise ValueError(f"tensor {name}: invalid shape {shape} (1 to {MAX_DIMS} dims, each >= 1)")
        block, block_bytes = BLOCK_LAYOUT[t]
        if shape[-1] % block:
            raise ValueError(f"tensor {name}: last dimension {shape[-1]} is not a multiple of the {t.name} "
                             f"block size {block}")
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * block_bytes
        pending = _PendingTensor(name, t, shape, nbytes, data)
        if isinstance(data, np.ndarray):
            self._tensor_bytes(pending)  # validate now, not half-way through write()
        self._tensors[name] = pending

    @staticmethod
    def _tensor_bytes(p: _PendingTensor) -> np.ndarray:
        data = p.source() if callable(p.source) and not isinstance(p.source, np.ndarray) else p.source
        data = np.asarray(data)
        if p.type == GGMLType.F32 and data.dtype.kind == "f":
            data = data.astype("<f4", copy=False)
        elif p.type == GGMLType.F16 and data.dtype.kind == "f":
            data = data.astype("<f2", copy=False)
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if raw.nbytes != p.nbytes:
            raise ValueError(f"tensor {p.name}: {raw.nbytes} bytes of data but {p.type.name} {list(p.shape)} "
                             f"needs {p.nbytes}")
        return raw

    # -- output -------------------------------------------------------------------------------------------

    def _infos(self) -> tuple[bytes, list[int]]:
        parts = []
        offsets = []
        rel = 0
        for p in self._tensors.values():
            offsets.append(rel)
            parts.append(_encode_string(p.name) + _U32.pack(len(p.shape))
                         + b"".join(_U64.pack(d) for d in reversed(p.shape))
                         + _U32.pack(p.type) + _U64.pack(rel))
            rel = _align_up(rel + p.nbytes, self.alignment)
        return b"".join(parts), offsets

    def write(self) -> None:
        if self._written:
            raise ValueError(f"{self.path}: already written")
        header = _HEADER.pack(GGUF_MAGIC, GGUF_VERSION, len(self._tensors), len(self._kv))
        infos, offsets = self._infos()
        head = header + b"".join(self._kv.values()) + infos
        head += b"\0" * (_align_up(len(head), self.alignment) - len(head))
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                for p, rel in zip(self._tensors.values(), offsets, strict=True):
                    assert f.tell() == len(head) + rel
                    raw = self._tensor_bytes(p)
                    f.write(raw.data)
                    f.write(b"\0" * (_align_up(p.nbytes, self.alignment) - p.nbytes))
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._written = True

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.write()
