"""GGUF reader (hardened against crafted files), writer (round trips, gguf-py compatibility) and `info`."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realizar.errors import GGUFError
from realizar.gguf import MAX_ALIGNMENT, MAX_LAYERS, GGUFFile, GGUFValueType, GGUFWriter
from realizar.info import info_dict, info_text
from realizar.types import GGMLType

V = GGUFValueType


# ---------------------------------------------------------------------------------------------------------
# A byte-level builder, independent of GGUFWriter, for files the writer refuses to produce.

def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_u32(key: str, x: int) -> bytes:
    return kv(key, V.UINT32, u32(x))


def kv_str(key: str, s: str | bytes) -> bytes:
    return kv(key, V.STRING, gstr(s))


def arr(etype: int, count: int, body: bytes) -> bytes:
    return u32(etype) + u64(count) + body


def kv_strs(key: str, items: list[str]) -> bytes:
    return kv(key, V.ARRAY, arr(V.STRING, len(items), b"".join(gstr(s) for s in items)))


def tinfo(name: str | bytes, dims: list[int], ttype: int = GGMLType.F32, offset: int = 0) -> bytes:
    """dims in GGUF order (innermost first)."""
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def raw_gguf(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, version: int = 3,
             n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    head = (b"GGUF" + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    pad = (-len(head)) % alignment if infos else 0
    return head + b"\0" * pad + data


F32_4 = np.arange(4, dtype=np.float32).tobytes()  # one 4-element F32 tensor


@pytest.fixture
def write(tmp_path):
    def _write(content: bytes, name: str = "model.gguf") -> Path:
        p = tmp_path / name
        p.write_bytes(content)
        return p
    return _write


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert msg.startswith(str(path) + ": "), msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------------
# The small valid file used by round trips and fuzzing.

def build_small(path: Path, alignment: int = 32) -> None:
    rng = np.random.default_rng(0)
    with GGUFWriter(path, arch="llama", alignment=alignment) as w:
        w.add("general.name", "tiny")
        w.add("llama.block_count", 2)
        w.add("llama.context_length", 64)
        w.add("llama.rope.freq_base", 10000.0)
        w.add("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add("tokenizer.ggml.model", "gpt2")
        w.add("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "ab", "é"])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0, -4.0, -5.0], V.FLOAT32)
        w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1], V.INT32)
        w.add("tokenizer.ggml.merges", ["a b"])
        w.add("tokenizer.ggml.bos_token_id", 0)
        w.add("custom.nested", [[1, 2], [3]])
        w.add_int8("custom.i8", -5)
        w.add_uint64("custom.u64", 2**63 + 5)
        w.add_float64("custom.f64", 0.1)
        w.add_tensor("token_embd.weight", rng.standard_normal((6, 32)).astype(np.float32))
        w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32).astype(np.float16))
        w.add_tensor("blk.1.ffn_down.weight", rng.integers(0, 256, 2 * 18, dtype=np.uint8), "Q4_0", (2, 32))


@pytest.fixture(scope="module")
def small_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("small") / "small.gguf"
    build_small(p)
    return p.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Reading valid files

def test_reads_every_scalar_type(write):
    kvs = [
        kv("u8", V.UINT8, b"\xff"), kv("i8", V.INT8, b"\x80"),
        kv("u16", V.UINT16, struct.pack("<H", 65535)), kv("i16", V.INT16, struct.pack("<h", -2)),
        kv("u32", V.UINT32, u32(2**32 - 1)), kv("i32", V.INT32, struct.pack("<i", -7)),
        kv("f32", V.FLOAT32, struct.pack("<f", 1.5)), kv("bool", V.BOOL, b"\x01"),
        kv_str("str", "héllo"), kv("u64", V.UINT64, u64(2**64 - 1)),
        kv("i64", V.INT64, struct.pack("<q", -(2**63))), kv("f64", V.FLOAT64, struct.pack("<d", 0.1)),
    ]
    p = write(raw_gguf(kvs))
    with GGUFFile(p) as gf:
        assert gf.metadata == {"u8": 255, "i8": -128, "u16": 65535, "i16": -2, "u32": 2**32 - 1, "i32": -7,
                               "f32": 1.5, "bool": True, "str": "héllo", "u64": 2**64 - 1, "i64": -(2**63),
                               "f64": 0.1}
        assert gf.types["u16"] == V.UINT16 and gf.types["f64"] == V.FLOAT64
        assert gf.tensors == {} and gf.alignment == 32 and gf.version == 3 and gf.architecture is None


def test_reads_arrays_of_every_type(write):
    kvs = [
        kv("a.u8", V.ARRAY, arr(V.UINT8, 3, b"\x01\x02\x03")),
        kv("a.i16", V.ARRAY, arr(V.INT16, 2, struct.pack("<2h", -1, 5))),
        kv("a.f32", V.ARRAY, arr(V.FLOAT32, 2, struct.pack("<2f", 0.5, -2))),
        kv("a.f64", V.ARRAY, arr(V.FLOAT64, 1, struct.pack("<d", 3.25))),
        kv("a.u64", V.ARRAY, arr(V.UINT64, 1, u64(2**64 - 1))),
        kv("a.bool", V.ARRAY, arr(V.BOOL, 3, b"\x01\x00\x01")),
        kv("a.str", V.ARRAY, arr(V.STRING, 2, gstr("x") + gstr(""))),
        kv("a.empty", V.ARRAY, arr(V.INT32, 0, b"")),
        kv("a.nested", V.ARRAY, arr(V.ARRAY, 2, arr(V.INT32, 1, u32(7)) + arr(V.STRING, 1, gstr("y")))),
    ]
    with GGUFFile(write(raw_gguf(kvs))) as gf:
        m = gf.metadata
        assert m["a.u8"].dtype == np.uint8 and m["a.u8"].tolist() == [1, 2, 3]
        assert m["a.i16"].tolist() == [-1, 5] and m["a.f32"].dtype == np.float32 and m["a.f32"].tolist() == [0.5, -2]
        assert m["a.f64"].tolist() == [3.25] and m["a.u64"].tolist() == [2**64 - 1]
        assert m["a.bool"].dtype == np.bool_ and m["a.bool"].tolist() == [True, False, True]
        assert m["a.str"] == ["x", ""] and m["a.empty"].size == 0
        assert m["a.nested"][0].tolist() == [7] and m["a.nested"][1] == ["y"]
        assert gf.array_types["a.nested"] == V.ARRAY and gf.array_types["a.str"] == V.STRING


def test_version_2_and_tensor_layout(write):
    data = F32_4 + b"\0" * 16 + np.ones(8, np.float32).tobytes()
    infos = [tinfo("a", [4]), tinfo("b", [4, 2], offset=32)]
    p = write(raw_gguf([kv_str("general.name", "v2")], infos, data, version=2))
    with GGUFFile(p) as gf:
        assert gf.version == 2
        a, b = gf.tensors["a"], gf.tensors["b"]
        assert b.shape == (2, 4) and b.n_elements == 8 and b.nbytes == 32 and b.type == "F32"
        assert b.type_id == GGMLType.F32 and b.offset == gf.data_offset + 32
        assert gf.data_offset % 32 == 0 and gf.file_size == p.stat().st_size
        np.testing.assert_array_equal(a.data.view(np.float32), np.arange(4))
        assert b.as_array().shape == (2, 4) and not b.data.flags.writeable


def test_invalid_utf8_in_values_replaced_and_tokens_preserved(write, tmp_path):
    kvs = [kv_str("general.name", b"bad\xff"), kv_strs("tokenizer.ggml.tokens", ["ok"]),
           kv("tokenizer.ggml.merges", V.ARRAY, arr(V.STRING, 1, gstr(b"\xe2\x82 x")))]
    with GGUFFile(write(raw_gguf(kvs))) as gf:
        assert gf.metadata["general.name"] == "bad\ufffd"
        merge = gf.metadata["tokenizer.ggml.merges"][0]
        assert merge.encode("utf-8", "surrogateescape") == b"\xe2\x82 x"
        out = tmp_path / "out.gguf"
        with GGUFWriter(out) as w:  # lossless round trip of such tokens
            w.add("tokenizer.ggml.merges", gf.metadata["tokenizer.ggml.merges"])
        assert GGUFFile(out).metadata["tokenizer.ggml.merges"] == [merge]


def test_vocab_only_file_with_block_count_loads(write):
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 30),
           kv_strs("tokenizer.ggml.tokens", ["a", "b"])]
    with GGUFFile(write(raw_gguf(kvs))) as gf:
        assert gf.architecture == "llama" and gf.tensors == {}


def test_alignment_is_honoured(write):
    kvs = [kv_u32("general.alignment", 64)]
    p = write(raw_gguf(kvs, [tinfo("a", [4]), tinfo("b", [4], offset=64)], F32_4 + b"\0" * 48 + F32_4,
                       alignment=64))
    with GGUFFile(p) as gf:
        assert gf.alignment == 64 and gf.data_offset % 64 == 0 and gf.tensors["b"].offset == gf.data_offset + 64


# ---------------------------------------------------------------------------------------------------------
# Malformed files: every one must be a GGUFError naming the file and the problem.

def test_bad_magic(write):
    expect_error(write(b"GGML" + b"\0" * 40), "not a GGUF file")


def test_empty_and_tiny_files(write):
    expect_error(write(b""), "truncated")
    expect_error(write(b"GG"), "truncated")
    expect_error(write(b"GGUF" + u32(3) + u64(0)), "truncated", "header")


@pytest.mark.parametrize("version, fragment", [(1, "version 1 is not supported"), (0, "unsupported GGUF version 0"),
                                               (4, "unsupported GGUF version 4"), (0x03000000, "big-endian")])
def test_unsupported_versions(write, version, fragment):
    expect_error(write(raw_gguf(version=version)), fragment)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


@pytest.mark.parametrize("n_kv, n_tensors, fragment", [
    (2**40, 0, "metadata count"), (2**64 - 1, 0, "metadata count"), (5, 0, "metadata count 5"),
    (0, 2**40, "tensor count"), (0, 3, "tensor count 3"), (2**20 + 1, 0, "metadata count"),
])
def test_absurd_counts(write, n_kv, n_tensors, fragment):
    expect_error(write(raw_gguf([kv_u32("x", 1)], n_kv=n_kv, n_tensors=n_tensors)), fragment, "absurd")


def _valid_parts():
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1),
           kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT32, 2, struct.pack("<2f", 0, 1))),
           kv_strs("tokenizer.ggml.tokens", ["a", "b"])]
    infos = [tinfo("blk.0.w", [4])]
    return kvs, infos, F32_4


def test_truncation_inside_every_section(write):
    kvs, infos, data = _valid_parts()
    full = raw_gguf(kvs, infos, data)
    GGUFFile(write(full)).close()
    start_kv = 24
    key_end = start_kv + 8 + len("general.architecture")
    scores = full.index(b"tokenizer.ggml.scores") + len("tokenizer.ggml.scores") + 4 + 4 + 8
    info_start = full.index(b"blk.0.w") - 8
    cases = {
        "header": 20,
        "kv key": start_kv + 8 + 5,
        "kv value": key_end + 4 + 3,
        "array": scores + 5,
        "tensor info": info_start + 8 + 7 + 4 + 3,
        "data": len(full) - 1,
    }
    for section, cut in cases.items():
        msg = expect_error(write(full[:cut], f"cut-{section.replace(' ', '_')}.gguf"))
        assert "truncated" in msg or "past end of file" in msg or "absurd" in msg, (section, msg)
    expect_error(write(full[:len(full) - 1], "d.gguf"), "tensor blk.0.w extends past end of file", "size 16")


def test_string_length_past_end(write):
    expect_error(write(raw_gguf([u64(2**63) + b"k" * 20])), "metadata key", "runs past end of file")
    body = u64(2**62) + b"abc"
    expect_error(write(raw_gguf([kv("k", V.STRING, body)])), "value of k", "runs past end of file")
    expect_error(write(raw_gguf([u64(2**64 - 1) + b"key" + u32(V.UINT8) + b"\0"])), "runs past end of file")


def test_array_length_past_end(write):
    expect_error(write(raw_gguf([kv("k", V.ARRAY, arr(V.UINT32, 2**61, u32(1)))])), "k: array of", "past end")
    expect_error(write(raw_gguf([kv("k", V.ARRAY, arr(V.STRING, 10, gstr("a")))])), "k: array of 10 string")
    expect_error(write(raw_gguf([kv("k", V.ARRAY, arr(V.STRING, 3, gstr("a") + gstr("b") + u64(99) + b"c"))])),
                 "k[2]: string length 99")


def test_unknown_value_types(write):
    expect_error(write(raw_gguf([kv("k", 13, u32(0))])), "value type of k", "unknown value type 13")
    expect_error(write(raw_gguf([kv("k", V.ARRAY, arr(77, 1, b"\0"))])), "element type of k", "unknown value type 77")


def test_invalid_bool(write):
    expect_error(write(raw_gguf([kv("k", V.BOOL, b"\x02")])), "k: invalid bool value 2")
    expect_error(write(raw_gguf([kv("k", V.ARRAY, arr(V.BOOL, 2, b"\x00\x07"))])), "k: invalid bool value 7")


def test_nesting_depth_is_capped(write):
    body = b"".join(u32(V.ARRAY) + u64(1) for _ in range(20)) + u32(V.UINT8) + u64(0)
    expect_error(write(raw_gguf([kv("k", V.ARRAY, body)])), "nested deeper")


def test_keys_must_be_valid_and_unique(write):
    expect_error(write(raw_gguf([kv(b"k\xff", V.UINT8, b"\0")])), "metadata key", "not valid UTF-8")
    expect_error(write(raw_gguf([kv(b"", V.UINT8, b"\0")])), "empty metadata key")
    expect_error(write(raw_gguf([kv_u32("k", 1), kv_u32("k", 2)])), "duplicate metadata key 'k'")


@pytest.mark.parametrize("info, fragment", [
    (tinfo("t", [4], ttype=99), "tensor t has unknown type 99"),
    (tinfo("t", [4], ttype=GGMLType.Q4_0 + 2), "unknown type 4"),
    (tinfo("t", [1, 1, 1, 1, 4]), "tensor t has 5 dimensions"),
    (gstr("t") + u32(0) + u32(0) + u64(0), "tensor t has 0 dimensions"),
    (tinfo("t", [4, 0]), "invalid dimension 0"),
    (tinfo("t", [2**63, 1]), "invalid dimension"),
    (tinfo("t", [2**62, 2**2]), "overflows 64 bits"),
    (tinfo("t", [2**32, 2**32]), "overflows 64 bits"),
    (tinfo("t", [4], offset=2**40), "tensor t extends past end of file (offset"),
    (tinfo("t", [4], offset=2**64 - 32), "extends past end of file"),
    (tinfo("t", [2**20, 2**20]), "extends past end of file"),
    (tinfo("t", [2**31, 2**31]), "byte size of shape [2147483648, 2147483648] overflows 64 bits"),
    (tinfo("t", [4], offset=4), "offset 4 is not a multiple of the alignment 32"),
    (tinfo("t", [33], ttype=GGMLType.Q4_0), "innermost dimension 33 is not a multiple of the block size 32"),
    (tinfo("t", [128, 2], ttype=GGMLType.Q4_K), "innermost dimension 128"),
    (tinfo(b"t\xfe", [4]), "tensor name at offset"),
    (tinfo("", [4]), "empty tensor name"),
    (tinfo("x" * 2000, [4]), "2000 bytes long"),
])
def test_bad_tensor_info(write, info, fragment):
    expect_error(write(raw_gguf([], [info], F32_4 * 2)), fragment)


def test_duplicate_and_overlapping_tensors(write):
    expect_error(write(raw_gguf([], [tinfo("a", [4]), tinfo("a", [4], offset=32)], F32_4 * 16)),
                 "duplicate tensor name 'a'")
    expect_error(write(raw_gguf([], [tinfo("a", [16]), tinfo("b", [4], offset=32)], F32_4 * 16)),
                 "tensor b (offset", "overlaps tensor a")


@pytest.mark.parametrize("value, fragment", [
    (kv_u32("general.alignment", 48), "48 is not a power of two"),
    (kv_u32("general.alignment", 0), "0 is not a power of two"),
    (kv_u32("general.alignment", 2 * MAX_ALIGNMENT), "larger than the limit"),
    (kv_u32("general.alignment", 2**31), "larger than the limit"),
    (kv("general.alignment", V.INT32, u32(32)), "general.alignment must be a uint32, not int32"),
    (kv_str("general.alignment", "32"), "must be a uint32, not string"),
    (kv("general.alignment", V.FLOAT32, struct.pack("<f", 32)), "not float32"),
])
def test_bad_alignment(write, value, fragment):
    expect_error(write(raw_gguf([value], [tinfo("a", [4])], F32_4)), fragment)


@pytest.mark.parametrize("bad, fragment", [
    (kv("tokenizer.ggml.tokens", V.ARRAY, arr(V.INT32, 2, u32(1) * 2)),
     "tokenizer.ggml.tokens must be an array of string, not array of int32"),
    (kv_str("tokenizer.ggml.tokens", "ab"), "tokens must be an array of string, not string"),
    (kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT64, 2, b"\0" * 16)), "scores must be an array of float32"),
    (kv("tokenizer.ggml.token_type", V.ARRAY, arr(V.UINT32, 2, b"\0" * 8)),
     "token_type must be an array of int32, not array of uint32"),
    (kv("tokenizer.ggml.merges", V.ARRAY, arr(V.INT32, 1, b"\0" * 4)), "merges must be an array of string"),
    (kv("tokenizer.ggml.precompiled_charsmap", V.ARRAY, arr(V.UINT32, 1, b"\0" * 4)),
     "precompiled_charsmap must be an array of uint8 or int8, not array of uint32"),
    (kv("tokenizer.ggml.merges", V.ARRAY, arr(V.ARRAY, 1, arr(V.STRING, 0, b""))), "merges must be an array of"),
    (kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT32, 3, b"\0" * 12)),
     "scores has 3 entries but tokenizer.ggml.tokens has 2"),
    (kv("tokenizer.ggml.token_type", V.ARRAY, arr(V.INT32, 1, b"\0" * 4)), "token_type has 1 entries"),
])
def test_tokenizer_arrays_of_the_wrong_type(write, bad, fragment):
    expect_error(write(raw_gguf([kv_strs("tokenizer.ggml.tokens", ["a", "b"]), bad]
                                if b"ggml.tokens" not in bad[:40] else [bad])), fragment)


@pytest.mark.parametrize("block_count, names, fragment", [
    (1000, ["blk.0.w"], "llama.block_count is 1000 but layer 1 has no blk.1.* tensors (999 layers missing)"),
    (2, ["blk.0.w", "blk.5.w"], "tensor blk.5.w belongs to layer 5 but llama.block_count is 2"),
    (MAX_LAYERS + 1, ["blk.0.w"], f"llama.block_count {MAX_LAYERS + 1} is out of range"),
    (2**32 - 1, ["blk.0.w"], "out of range"),
    (2, ["blk.1.w", "output.weight"], "layer 0 has no blk.0.* tensors"),
])
def test_block_count_against_tensors(write, block_count, names, fragment):
    infos = [tinfo(n, [4], offset=32 * i) for i, n in enumerate(names)]
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", block_count)]
    expect_error(write(raw_gguf(kvs, infos, (F32_4 + b"\0" * 16) * len(names))), fragment)


def test_block_count_and_architecture_types(write):
    kvs = [kv_str("general.architecture", "llama"), kv_str("llama.block_count", "2")]
    expect_error(write(raw_gguf(kvs)), "llama.block_count must be an integer, not string")
    kvs = [kv("general.architecture", V.INT32, u32(1))]
    expect_error(write(raw_gguf(kvs)), "general.architecture must be a string, not int32")
    kvs = [kv_str("general.architecture", "llama"), kv("llama.block_count", V.INT32, struct.pack("<i", -1))]
    expect_error(write(raw_gguf(kvs)), "out of range")


def test_every_truncation_of_a_small_file(tmp_path, small_bytes):
    p = _put(tmp_path / "cut.gguf", small_bytes)
    with GGUFFile(p) as gf:
        data_end = max(t.offset + t.nbytes for t in gf.tensors.values())
    for n in reversed(range(len(small_bytes))):
        os.truncate(p, n)
        try:
            GGUFFile(p).close()
        except GGUFError as e:
            assert str(e).startswith(f"{p}: "), str(e)
        else:
            assert n >= data_end, f"a file cut to {n} bytes loaded"  # only trailing padding is missing


def _put(path: Path, content: bytes) -> Path:
    """Write `content`; rewriting in place, as truncating with open('wb') is slow on some file systems."""
    if path.exists():
        with open(path, "r+b") as f:
            f.write(content)
            f.truncate(len(content))
    else:
        path.write_bytes(content)
    return path


def _load_everything(path: Path) -> None:
    """Open and touch every value and tensor byte; anything but GGUFError propagates."""
    try:
        gf = GGUFFile(path)
    except GGUFError as e:
        assert str(e).startswith(str(path))
        return
    with gf:
        for t in gf.tensors.values():
            assert t.data.nbytes == t.nbytes
            int(t.data.sum())
        repr(gf.metadata)


_EXTREMES = [0, 1, 2, 3, 4, 5, 8, 9, 12, 31, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
_mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), st.sampled_from([x for x in _EXTREMES if x < 2**32])),
    st.tuples(st.just("u64"), st.integers(0, 10**6), st.sampled_from(_EXTREMES)),
)


def _mutate(content: bytes, mutations) -> bytes:
    b = bytearray(content)
    for kind, pos, value in mutations:
        pos %= len(b)
        if kind == "byte":
            b[pos] = value
        else:
            packed = struct.pack("<I" if kind == "u32" else "<Q", value)
            b[pos:pos + len(packed)] = packed
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_files_fail_cleanly(small_bytes, fuzz_dir, mutations):
    _load_everything(_put(fuzz_dir / "mut.gguf", _mutate(small_bytes, mutations)))


@pytest.mark.slow
@settings(max_examples=5000, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=12), cut=st.integers(0, 10**6))
def test_mutated_files_fail_cleanly_long(small_bytes, fuzz_dir, mutations, cut):
    content = _mutate(small_bytes, mutations)
    _load_everything(_put(fuzz_dir / "mut-long.gguf", content[:max(1, cut % (len(content) + 1))]))


# ---------------------------------------------------------------------------------------------------------
# Getters and lifetime

def test_typed_getters(tmp_path, small_bytes):
    p = _put(tmp_path / "small.gguf", small_bytes)
    with GGUFFile(p) as gf:
        assert gf.get_int("llama.block_count") == 2 and gf.types["llama.block_count"] == V.UINT32
        assert gf.get_float("llama.rope.freq_base") == 10000.0 and gf.get_float("llama.block_count") == 2.0
        assert gf.get_str("general.name") == "tiny" and gf.get_bool("tokenizer.ggml.add_bos_token") is True
        assert gf.get_int("missing", default=7) == 7 and gf.get_str("missing", default=None) is None
        assert gf.get_array("tokenizer.ggml.scores", elem_type="float32").dtype == np.float32
        assert gf.get_array("tokenizer.ggml.tokens", elem_type=V.STRING)[5] == "é"
        assert gf.get_array("custom.nested", elem_type=[V.ARRAY, V.STRING])[1].tolist() == [3]
        for getter, key, fragment in [
            (gf.get_int, "general.name", "'general.name' is string, expected an integer"),
            (gf.get_int, "llama.rope.freq_base", "is float32, expected an integer"),
            (gf.get_float, "general.name", "expected a float"),
            (gf.get_str, "llama.block_count", "is uint32, expected a string"),
            (gf.get_bool, "llama.block_count", "expected a bool"),
            (gf.get_array, "general.name", "expected an array"),
            (gf.get_int, "tokenizer.ggml.tokens", "is array of string, expected an integer"),
            (gf.get_int, "nope", "missing metadata key 'nope'"),
        ]:
            with pytest.raises(GGUFError, match=fragment) as e:
                getter(key)
            assert str(e.value).startswith(str(p))
        with pytest.raises(GGUFError, match="array of token_type is|expected an array of int32"):
            gf.get_array("tokenizer.ggml.scores", elem_type="int32")


def test_views_survive_close(tmp_path, small_bytes):
    p = _put(tmp_path / "small.gguf", small_bytes)
    gf = GGUFFile(p)
    t = gf.tensors["token_embd.weight"]
    view = t.as_array()
    expected = view.copy()
    gf.close()
    gf.close()
    assert gf.closed
    np.testing.assert_array_equal(view, expected)  # mapping kept alive by the view
    with pytest.raises(GGUFError, match="closed"):
        _ = t.data
    with GGUFFile(p) as gf2:
        assert not gf2.closed
    assert gf2.closed


# ---------------------------------------------------------------------------------------------------------
# Writer

def test_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    f16 = rng.standard_normal((2, 2, 32)).astype(np.float16)
    q4k = rng.integers(0, 256, 2 * 144, dtype=np.uint8)
    q8 = rng.integers(0, 256, 4 * 34, dtype=np.uint8)
    for alignment in (1, 32, 64, 4096):
        p = tmp_path / f"rt{alignment}.gguf"
        with GGUFWriter(p, arch="llama", alignment=alignment) as w:
            w.add("a.int", -3)
            w.add("a.uint", 2**31 + 1)
            w.add("a.i64", -(2**40))
            w.add("a.u64", 2**63 + 1)
            w.add("a.float", 0.25)
            w.add("a.bool", False)
            w.add("a.str", "ünï")
            w.add("a.ints", [1, 2, -3])
            w.add("a.floats", np.array([1.5, 2.5], dtype=np.float64))
            w.add("a.bools", [True, False])
            w.add("a.strs", ["x", "", "yz"])
            w.add_array("a.empty", [], "uint16")
            w.add("a.nested", [[1.0], ["s", "t"], [[1, 2]]])
            w.add_tensor("f32", f32)
            w.add_tensor("f16", f16)
            w.add_tensor("q4k", q4k, "Q4_K", (2, 256))
            w.add_tensor("q8", lambda: q8, GGMLType.Q8_0, (2, 64))  # produced during write()
            w.add_tensor("f16_from_f32", f32, "F16")
        with GGUFFile(p) as gf:
            m = gf.metadata
            assert gf.alignment == alignment and gf.architecture == "llama"
            assert [m[k] for k in ("a.int", "a.uint", "a.i64", "a.u64", "a.float", "a.bool", "a.str")] == \
                [-3, 2**31 + 1, -(2**40), 2**63 + 1, 0.25, False, "ünï"]
            assert [gf.types[k] for k in ("a.int", "a.uint", "a.i64", "a.u64", "a.float", "a.bool")] == \
                [V.INT32, V.UINT32, V.INT64, V.UINT64, V.FLOAT32, V.BOOL]
            assert m["a.ints"].dtype == np.int32 and m["a.ints"].tolist() == [1, 2, -3]
            assert m["a.floats"].dtype == np.float64 and m["a.bools"].tolist() == [True, False]
            assert m["a.strs"] == ["x", "", "yz"] and gf.array_types["a.empty"] == V.UINT16 and m["a.empty"].size == 0
            assert m["a.nested"][0].tolist() == [1.0] and m["a.nested"][1] == ["s", "t"]
            assert m["a.nested"][2][0].tolist() == [1, 2]
            ts = gf.tensors
            assert list(ts) == ["f32", "f16", "q4k", "q8", "f16_from_f32"]
            np.testing.assert_array_equal(ts["f32"].as_array(), f32)
            np.testing.assert_array_equal(ts["f16"].as_array(), f16)
            assert ts["q4k"].type == "Q4_K" and ts["q4k"].shape == (2, 256)
            assert ts["q4k"].data.tobytes() == q4k.tobytes() and ts["q8"].data.tobytes() == q8.tobytes()
            assert ts["q4k"].as_array().shape == (2, 144)
            np.testing.assert_array_equal(ts["f16_from_f32"].as_array(), f32.astype(np.float16))
            assert all(t.offset % alignment == 0 for t in ts.values())


def test_writer_type_inference_for_known_keys(tmp_path):
    p = tmp_path / "k.gguf"
    with GGUFWriter(p, arch="qwen2") as w:
        w.add("qwen2.block_count", 0)
        w.add("qwen2.rope.freq_base", 1000000)
        w.add("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
        w.add("tokenizer.ggml.eos_token_id", 5)
        w.add("general.file_type", 2)
        w.add("x.explicit", 5, type="uint8")
    with GGUFFile(p) as gf:
        assert gf.types["qwen2.block_count"] == V.UINT32 and gf.types["qwen2.rope.freq_base"] == V.FLOAT32
        assert gf.metadata["qwen2.rope.freq_base"] == 1e6 and gf.types["tokenizer.ggml.eos_token_id"] == V.UINT32
        assert gf.types["general.file_type"] == V.UINT32 and gf.types["x.explicit"] == V.UINT8


def test_writer_rejects_bad_input(tmp_path):
    w = GGUFWriter(tmp_path / "w.gguf")
    w.add("k", 1)
    with pytest.raises(ValueError, match="duplicate metadata key"):
        w.add("k", 2)
    with pytest.raises(ValueError, match="empty array"):
        w.add("e", [])
    with pytest.raises(ValueError, match="does not fit in uint8"):
        w.add_uint8("u", 256)
    with pytest.raises(ValueError, match="does not fit"):
        w.add("big", 2**64)
    with pytest.raises(TypeError):
        w.add_uint32("f", 1.5)
    with pytest.raises(TypeError, match="mixes"):
        w.add("mix", ["a", 1])
    with pytest.raises(ValueError, match="general.alignment"):
        w.add_uint32("general.alignment", 64)
    with pytest.raises(ValueError, match="power of two"):
        GGUFWriter(tmp_path / "x.gguf", alignment=48)
    with pytest.raises(ValueError, match="power of two"):
        GGUFWriter(tmp_path / "x.gguf", alignment=2 * MAX_ALIGNMENT)
    with pytest.raises(ValueError, match="needs 36"):
        w.add_tensor("q", np.zeros(35, np.uint8), "Q4_0", (2, 32))
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size"):
        w.add_tensor("q", np.zeros(18, np.uint8), "Q4_0", (1, 16))
    with pytest.raises(ValueError, match="shape is required"):
        w.add_tensor("q", np.zeros(18, np.uint8), "Q4_0")
    with pytest.raises(ValueError, match="type is required"):
        w.add_tensor("q", np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="invalid shape"):
        w.add_tensor("q", np.zeros((1, 1, 1, 1, 1), np.float32))
    w.add_tensor("t", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="duplicate tensor name"):
        w.add_tensor("t", np.zeros(4, np.float32))
    w.write()
    with pytest.raises(ValueError, match="already written"):
        w.write()


def test_writer_leaves_no_file_on_failure(tmp_path):
    p = tmp_path / "fail.gguf"
    w = GGUFWriter(p)
    w.add_tensor("t", lambda: np.zeros(3, np.float32), "F32", (4,))
    with pytest.raises(ValueError, match="needs 16"):
        w.write()
    assert list(tmp_path.iterdir()) == []


def _gguf_py_value(field):
    return field.contents()


def test_written_files_load_in_gguf_py(tmp_path, small_bytes):
    gguf = pytest.importorskip("gguf")
    p = _put(tmp_path / "small.gguf", small_bytes)
    reader = gguf.GGUFReader(str(p))
    with GGUFFile(p) as gf:
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(fields) == list(gf.metadata)
        for key, value in gf.metadata.items():
            f = fields[key]
            assert int(f.types[0]) == gf.types[key], key
            if gf.types[key] == V.ARRAY:
                assert int(f.types[1]) == gf.array_types[key], key
            if key == "custom.nested":
                continue  # gguf-py does not decode nested arrays' contents
            theirs = f.contents()
            ours = value.tolist() if isinstance(value, np.ndarray) else value
            if gf.types[key] == V.FLOAT32:
                assert np.float32(theirs) == np.float32(ours), key
            elif gf.array_types.get(key) == V.FLOAT32:
                np.testing.assert_array_equal(np.float32(theirs), np.float32(ours))
            else:
                assert theirs == ours, key
        assert [t.name for t in reader.tensors] == list(gf.tensors)
        for rt in reader.tensors:
            t = gf.tensors[rt.name]
            assert rt.tensor_type.name == t.type and tuple(int(d) for d in reversed(rt.shape)) == t.shape
            assert rt.data_offset == t.offset and rt.n_bytes == t.nbytes and rt.n_elements == t.n_elements
            assert np.ascontiguousarray(rt.data).tobytes() == t.data.tobytes()


def test_gguf_py_written_file_reads_identically(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_float32("x.f", 0.5)
    w.add_array("x.a", [1, 2, 3])
    w.add_token_list(["a", "b"])
    w.add_tensor("blk.0.w", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("blk.0.q", np.zeros((2, 68), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(p) as gf:
        assert gf.architecture == "llama" and gf.get_int("llama.block_count") == 1
        assert gf.metadata["x.a"].tolist() == [1, 2, 3] and gf.metadata["tokenizer.ggml.tokens"] == ["a", "b"]
        np.testing.assert_array_equal(gf.tensors["blk.0.w"].as_array(), np.arange(64).reshape(2, 32))
        assert gf.tensors["blk.0.q"].shape == (2, 64) and gf.tensors["blk.0.q"].nbytes == 136


# ---------------------------------------------------------------------------------------------------------
# The real model and `info`

def test_real_model_opens(model_path):
    # Open time (about 0.1 s here) is measured in benchmarks, not asserted: these machines are shared.
    with GGUFFile(model_path) as gf:
        assert gf.version == 3 and gf.architecture == "llama" and len(gf.tensors) == 272
        assert len(gf.get_array("tokenizer.ggml.tokens", "string")) == 49152
        assert len(gf.get_array("tokenizer.ggml.merges", "string")) == 48900
        t = gf.tensors["token_embd.weight"]
        assert t.type == "Q8_0" and t.shape == (49152, 576) and t.data.nbytes == 49152 * 18 * 34
        assert {x.type for x in gf.tensors.values()} == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.slow
def test_real_model_matches_gguf_py(model_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(model_path))
    with GGUFFile(model_path) as gf:
        for rt in reader.tensors:
            t = gf.tensors[rt.name]
            assert (rt.data_offset, rt.n_bytes, rt.tensor_type.name) == (t.offset, t.nbytes, t.type)
        assert reader.fields["tokenizer.ggml.merges"].contents() == gf.metadata["tokenizer.ggml.merges"]


def test_info_on_real_model(model_path):
    d = info_dict(model_path)
    json.dumps(d)
    assert d["architecture"] == "llama" and d["gguf_version"] == 3 and d["n_tensors"] == 272
    assert d["hyperparameters"]["block_count"] == 30 and d["hyperparameters"]["embedding_length"] == 576
    assert d["hyperparameters"]["head_count"] == 9 and d["hyperparameters"]["head_count_kv"] == 3
    assert d["tokenizer"]["model"] == "gpt2" and d["tokenizer"]["vocab_size"] == 49152
    assert d["tokenizer"]["bos_token_id"] == 1 and d["has_chat_template"] is True
    assert d["n_parameters"] == 134515008 and d["file_size"] == model_path.stat().st_size
    assert set(d["tensor_types"]) == {"Q4_1", "Q8_0", "F32"} and d["tensor_types"]["Q4_1"]["count"] == 210
    text = info_text(model_path)
    assert "architecture" in text and "llama" in text and "Q4_1" in text


def test_info_on_synthetic_file(tmp_path, small_bytes):
    p = _put(tmp_path / "small.gguf", small_bytes)
    d = info_dict(p)
    assert json.loads(json.dumps(d)) == d
    assert d["architecture"] == "llama" and d["name"] == "tiny" and d["gguf_version"] == 3
    assert d["hyperparameters"] == {"block_count": 2, "context_length": 64, "rope_freq_base": 10000.0,
                                    "rms_norm_eps": pytest.approx(1e-5)}
    assert d["tokenizer"]["vocab_size"] == 6 and d["tokenizer"]["add_bos_token"] is True
    assert d["tokenizer"]["bos_token_id"] == 0 and d["tokenizer"]["eos_token_id"] is None
    assert d["has_chat_template"] is False and d["n_tensors"] == 3 and d["n_parameters"] == 6 * 32 + 32 + 64
    assert d["tensor_types"]["Q4_0"] == {"count": 1, "bytes": 36, "parameters": 64}
    lines = info_text(p).splitlines()
    kv_lines = lines[:lines.index("")]
    assert len({re.match(r"^\S+(?: \S+)*  +", line).end() for line in kv_lines}) == 1  # values in one column
    assert any(line.startswith("type") for line in lines)


def test_info_on_file_without_metadata(write):
    p = write(raw_gguf([], [tinfo("t", [4])], F32_4))
    d = info_dict(p)
    assert d["architecture"] is None and d["hyperparameters"] == {} and d["n_parameters"] == 4
    assert "architecture" in info_text(p)
    with pytest.raises(GGUFError):
        info_dict(write(b"nope", "bad.gguf"))
