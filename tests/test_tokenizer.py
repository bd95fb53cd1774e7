"""Tokenizers from GGUF metadata: llama.cpp's ids on the real model, round trips, streaming, SentencePiece."""
from __future__ import annotations

import io
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from realizar.errors import ModelError
from realizar.tokenizer import (
    _FUSED,
    PRE_TOKENIZER_REGEXES,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_USER_DEFINED,
    Tokenizer,
    _ByteLevelBPE,
    _split_staged,
    bytes_to_unicode,
    sentencepiece_metadata,
)

# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


def read_metadata(path) -> dict:
    """GGUF metadata as realizar.gguf gives it; the gguf package when realizar.gguf is not there."""
    try:
        from realizar.gguf import GGUFFile
    except ImportError:
        GGUFFile = None
    if GGUFFile is not None:
        return dict(GGUFFile(str(path)).metadata)
    import gguf

    md = {}
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[1] == gguf.GGUFValueType.STRING:
                md[key] = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                md[key] = np.array([field.parts[i][0] for i in field.data])
        elif kind == gguf.GGUFValueType.STRING:
            md[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            md[key] = field.parts[field.data[0]][0].item()
    return md


@pytest.fixture(scope="module")
def smollm(model_path) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(model_path))


def native_core():
    """realizar._core when it has the C++ BPE encoder (cpp/bpe.h), else None."""
    from realizar.tokenizer import _native_bpe_class

    if _native_bpe_class() is None:
        return None
    import realizar._core as core

    return core


needs_native = pytest.mark.skipif(native_core() is None, reason="the compiled core has no BpeEncoder")


def english_corpus(nbytes: int) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_tokenizer import english_corpus as corpus

    return corpus(nbytes)


# Text with the things tokenizers get wrong: spaces and tabs, digits, contractions, accents, CJK, emoji
# (4-byte and ZWJ sequences), combining marks, control and format characters, lone special-token texts.
_pieces = st.sampled_from([
    " ", "  ", "\t", "\n", "\r\n", "\n\n", "'s", "'ll", "'RE", "don't", "123", "3.14", "²", "Ⅻ", "a", "The", " the",
    "café", "naïve", "e\u0301", "日本語", "中文", "русский", "🤖", "🚀", "👩\u200d💻", "🇫🇷", "\u200b", "\x00", "\x1f",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<", "|", ">", "!!", "...", "«»", "\u3000", "\xa0", "\u2581",
])
mixed_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(_pieces, st.text(max_size=4)), max_size=25).map("".join),
)
hyp = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (gpt2 byte-level BPE, pre-tokenizer `smollm`) against llama.cpp
# ---------------------------------------------------------------------------------------------------------

def test_smollm_vocabulary_facts(smollm):
    assert smollm.model == "gpt2" and smollm.pre == "smollm"
    assert smollm.vocab_size == 49152
    assert smollm.bos_id == 1 and smollm.eos_id == 2
    assert smollm.eog_ids == {0, 2}  # <|endoftext|>, <|im_end|> (= eos)
    assert not smollm.add_bos and not smollm.add_eos
    assert smollm.special_tokens["<|im_start|>"] == 1
    assert smollm.special_tokens["<|im_end|>"] == 2
    assert "Hello" not in smollm.special_tokens
    assert "{% for message in messages %}" in smollm.chat_template


def test_ids_equal_llamacpp(smollm, reference):
    cases = reference["variants"]["Q4_1"]["tokenize"]
    assert len(cases) >= 10
    for case in cases:
        text = case["text"]
        assert smollm.encode(text, add_special=True, parse_special=False) == case["tokens_no_special"], text
        assert smollm.encode(text, add_special=True, parse_special=True) == case["tokens_special"], text
        assert smollm.decode(case["tokens_no_special"]) == text
        assert smollm.decode(case["tokens_special"]) == text


def test_chat_prompt_ids_equal_llamacpp(smollm, reference):
    for case in reference["variants"]["Q4_1"]["prompts"]:
        if "<|im_start|>" in case["prompt"]:
            assert smollm.encode(case["prompt"], parse_special=True) == case["prompt_tokens"]


def test_special_tokens_only_when_asked(smollm):
    text = "<|im_start|>user\nHi<|im_end|>"
    plain = smollm.encode(text)
    assert 1 not in plain and 2 not in plain
    assert smollm.encode(text, parse_special=True)[0] == 1
    assert smollm.encode("<|im_end|><|im_end|>", parse_special=True) == [2, 2]
    assert smollm.encode("x<|endoftext|>", parse_special=True)[-1] == 0


def test_decode_special_rendering(smollm):
    ids = smollm.encode("<|im_start|>assistant\nHi<|im_end|>", parse_special=True)
    assert smollm.decode(ids) == "<|im_start|>assistant\nHi<|im_end|>"
    assert smollm.decode(ids, render_special=False) == "assistant\nHi"
    assert smollm.token_to_piece(1) == b"<|im_start|>"
    assert smollm.token_to_piece(1, render_special=False) == b""
    assert smollm.token_to_piece(smollm.encode(" the")[0]) == b" the"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.decode([49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.token_to_piece(-1)


def test_byte_tokens_for_split_characters(smollm):
    # an emoji BPE cannot merge whole comes out as byte tokens whose pieces are fragments of its UTF-8
    ids = smollm.encode("🤖")
    assert b"".join(smollm.token_to_piece(i) for i in ids) == "🤖".encode()
    assert smollm.decode(ids[:1]) == "\ufffd"


def representable(tok: Tokenizer, text: str) -> bool:
    """Every byte of `text` has its byte-level token (SmolLM2 lacks a few, see the tokenizer docstring)."""
    return all(BYTE_CHARS[b] in tok._encoder.token_to_id for b in text.encode())


@hyp
@given(mixed_text)
def test_round_trip(smollm, text):
    assume(representable(smollm, text))
    assert smollm.decode(smollm.encode(text)) == text
    assert smollm.decode(smollm.encode(text, parse_special=True)) == text


@hyp
@given(mixed_text)
def test_streaming_detokenizer_equals_decode(smollm, text):
    assume(representable(smollm, text))
    ids = smollm.encode(text, parse_special=True)
    stream = smollm.detokenizer()
    chunks = [stream.add(i) for i in ids]
    chunks.append(stream.flush())
    assert "".join(chunks) == smollm.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)  # never a split character


def test_piece_table_is_built_once_under_concurrent_first_use(model_path, monkeypatch):
    # A server's first burst of requests each asks for a detokenizer at once: the 49k-entry table behind it
    # must be built by one of them, not once per thread (which stalled 48 concurrent first requests for 5 s).
    import threading

    tok = Tokenizer.from_metadata(read_metadata(model_path))
    calls = {True: 0, False: 0}
    render = Tokenizer._render

    def counting(self, token_id, render_special):
        calls[render_special] += 1
        return render(self, token_id, render_special)

    monkeypatch.setattr(Tokenizer, "_render", counting)
    start = threading.Barrier(8)
    tables = []

    def first_use(special: bool) -> None:
        start.wait()
        tables.append((special, tok.detokenizer(render_special=special)._table))

    threads = [threading.Thread(target=first_use, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = len(tok.tokens)
    assert calls == {True: n, False: n}
    for special in (True, False):
        assert len({id(t) for s, t in tables if s is special}) == 1  # one table shared by every caller
    assert tok.decode(tok.encode("Hello, world")) == "Hello, world"


def test_streaming_holds_back_incomplete_bytes(smollm):
    ids = smollm.encode("a🤖")
    assert len(ids) >= 3  # 'a' + the emoji's byte tokens
    stream = smollm.detokenizer()
    assert stream.add(ids[0]) == "a"
    assert [stream.add(i) for i in ids[1:-1]] == [""] * (len(ids) - 2)
    assert stream.add(ids[-1]) == "🤖"
    assert stream.flush() == ""
    # a stream cut inside a character: flush gives the replacement character, as decode does
    stream = smollm.detokenizer()
    out = "".join(stream.add(i) for i in ids[:-1]) + stream.flush()
    assert out == smollm.decode(ids[:-1]) == "a\ufffd"


@pytest.mark.parametrize("family", ["gpt2", "smollm", "llama3", "qwen2"])
@settings(max_examples=60, deadline=None)
@given(text=mixed_text)
def test_fused_pre_tokenizer_equals_staged(family, text):
    # The one-pass regex used for speed must cut exactly where llama.cpp's staged split cuts.
    stages = [regex.compile(p) for p in PRE_TOKENIZER_REGEXES[family]]
    assert regex.compile(_FUSED[family]).findall(text) == _split_staged(text, stages)


def test_lone_surrogates_become_replacement_characters(smollm):
    assert smollm.encode("a\ud800b") == smollm.encode("a\ufffdb")
    assert smollm.decode(smollm.encode("x\udcff")) == "x\ufffd"


@needs_native
@hyp
@given(mixed_text)
def test_native_encoder_equals_python(smollm, text):
    encoder = smollm._encoder
    assert encoder.native is not None
    assert encoder.native.encode(text) == encoder.encode_python(text)


@needs_native
@pytest.mark.parametrize("family", ["gpt2", "smollm", "llama3", "qwen2"])
@settings(max_examples=60, deadline=None)
@given(text=mixed_text)
def test_native_pre_tokenizer_equals_regex(family, text):
    # The C++ letter/number tables are frozen at one Unicode version; the `regex` package follows newer ones.
    # Code points still unassigned in Python's own Unicode data may be classed differently: leave them out.
    assume(all(unicodedata.category(ch) != "Cn" for ch in text))
    data = text.encode()
    pieces = [data[a:b].decode() for a, b in native_core().bpe_pre_tokenize(text, family)]
    assert pieces == regex.compile(_FUSED[family]).findall(text)


@needs_native
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_native_encoder_on_small_vocabularies(pre):
    merges = ["a b", "ab c", "Ġ a", "Ġa b", "1 2", "12 3", "' s", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "ðŁ ¤", "ð Ł"]
    tok = tiny_gpt2(merges, extra=[("abcabc", TOKEN_NORMAL)], pre=pre, **{"tokenizer.ggml.add_bos_token": False})
    encoder = tok._encoder
    assert encoder.native is not None
    rng = np.random.default_rng(1)
    alphabet = ["a", "b", "c", " ", "1", "2", "3", "'s", "\n", "\t", "🤖", "é", "abcabc", "   ", "\r\n", "!"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        assert encoder.native.encode(text) == encoder.encode_python(text), text


def test_pre_tokenizer_examples():
    smollm = [regex.compile(p) for p in PRE_TOKENIZER_REGEXES["smollm"]]
    assert _split_staged("Numbers: 1234 a  1", smollm) == ["Numbers", ":", " ", "1", "2", "3", "4", " a", "  ", "1"]
    assert _split_staged("don't\n\nGo", smollm) == ["don", "'t", "\n", "\n", "Go"]
    llama3 = [regex.compile(p) for p in PRE_TOKENIZER_REGEXES["llama3"]]
    assert _split_staged("12345 I'M\n\n  x", llama3) == ["123", "45", " I", "'M", "\n\n", " ", " x"]
    default = [regex.compile(p) for p in PRE_TOKENIZER_REGEXES["default"]]
    assert _split_staged("a, 12345!", default) == ["a", ",", " ", "123", "45", "!"]


# ---------------------------------------------------------------------------------------------------------
# Byte-level BPE on small synthetic vocabularies
# ---------------------------------------------------------------------------------------------------------

BYTE_CHARS = bytes_to_unicode()


def tiny_gpt2(merges: list[str], extra: list[tuple[str, int]] = (), pre: str = "gpt-2", **md) -> Tokenizer:
    """A byte-level vocabulary: the 256 byte characters, every merge result, then `extra` (text, type)."""
    tokens = list(BYTE_CHARS)
    types = [TOKEN_NORMAL] * 256
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
            types.append(TOKEN_NORMAL)
    for text, ttype in extra:
        tokens.append(text)
        types.append(ttype)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": merges}
    meta.update(md)
    return Tokenizer.from_metadata(meta)


def ids_to_texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.tokens[i] for i in ids]


def test_merge_order_lowest_rank_then_leftmost():
    tok = tiny_gpt2(["b c", "a b", "c d"])
    assert ids_to_texts(tok, tok.encode("abcd")) == ["a", "bc", "d"]
    tok = tiny_gpt2(["a a", "aa a"])
    assert ids_to_texts(tok, tok.encode("aaaaa")) == ["aa", "aaa"]  # all "a a" first, leftmost first


def test_long_pieces_merge_like_short_ones():
    merges = ["a b", "b a", "ab a", "ba b", "aba b", "ab ab", "abab ab"]
    tok = tiny_gpt2(merges)
    encoder: _ByteLevelBPE = tok._encoder
    rng = np.random.default_rng(0)
    for length in (3, 17, 49, 64, 300):
        for _ in range(10):
            word = "".join(rng.choice(["a", "b"], size=length))
            assert encoder._merge_heap(word) == _short_merge(encoder, word)


def _short_merge(encoder: _ByteLevelBPE, word: str) -> list[str]:
    symbols = list(word)
    while len(symbols) > 1:
        pairs = [(encoder.ranks.get((symbols[i], symbols[i + 1])), i) for i in range(len(symbols) - 1)]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_special_partition_is_longest_token_first_over_the_text():
    # llama.cpp cuts the longest special text everywhere first: "abcd" -> "a" + <bcd>, not <ab> + "cd"
    tok = tiny_gpt2([], extra=[("ab", TOKEN_USER_DEFINED), ("bcd", TOKEN_USER_DEFINED), ("<c>", TOKEN_CONTROL)])
    ab, bcd, ctl = (tok.special_tokens[t] for t in ("ab", "bcd", "<c>"))
    assert tok.encode("abcd") == [tok.tokens.index("a"), bcd]
    assert tok.encode("abab") == [ab, ab]  # user-defined tokens are always matched
    assert ctl not in tok.encode("x<c>y")
    assert tok.encode("x<c>y", parse_special=True) == [tok.tokens.index("x"), ctl, tok.tokens.index("y")]


def test_bos_eos_rules_and_llama3_defaults():
    tok = tiny_gpt2(["a b"], extra=[("<s>", TOKEN_CONTROL), ("</s>", TOKEN_CONTROL)],
                    **{"tokenizer.ggml.bos_token_id": 257, "tokenizer.ggml.eos_token_id": 258,
                       "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    assert tok.encode("ab") == [257, 256, 258]
    assert tok.encode("ab", add_special=False) == [256]
    assert tok.encode("", add_special=True) == [257, 258]
    assert tok.eog_ids == {258}
    # llama3-family pre-tokenizers add BOS unless the metadata says otherwise, and take whole-token pieces as is
    llama3 = tiny_gpt2(["a b", "c d"], extra=[("abcd", TOKEN_NORMAL), ("<|begin_of_text|>", TOKEN_CONTROL)],
                       pre="llama-bpe", **{"tokenizer.ggml.bos_token_id": 259})
    assert llama3.add_bos
    assert llama3.encode("abcd") == [259, llama3.tokens.index("abcd")]
    assert tiny_gpt2(["a b", "c d"], extra=[("abcd", TOKEN_NORMAL)]).encode("abcd") == [256, 257]


def test_eog_tokens_by_text_become_control():
    tok = tiny_gpt2([], extra=[("<|eot_id|>", TOKEN_NORMAL), ("<|im_end|>", TOKEN_USER_DEFINED)],
                    **{"tokenizer.ggml.eos_token_id": 0})
    eot, im_end = 256, 257
    assert tok.eog_ids == {0, eot, im_end}
    assert tok.token_types[eot] == TOKEN_CONTROL and tok.token_types[im_end] == TOKEN_CONTROL
    assert eot not in tok.encode("<|eot_id|>") and tok.encode("<|eot_id|>", parse_special=True) == [eot]


@pytest.mark.parametrize(("change", "problem"), [
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model"),
    ({"tokenizer.ggml.pre": "klingon"}, "unsupported tokenizer.ggml.pre"),
    ({"tokenizer.ggml.tokens": []}, "missing or empty"),
    ({"tokenizer.ggml.tokens": "abc"}, "array of strings"),
    ({"tokenizer.ggml.token_type": np.array([1, 1], dtype=np.int32)}, "has 2 entries for 256 tokens"),
    ({"tokenizer.ggml.merges": ["ab"]}, r"merges\[0\]"),
    ({"tokenizer.ggml.bos_token_id": 999}, "outside the vocabulary"),
    ({"tokenizer.ggml.add_bos_token": True}, "no tokenizer.ggml.bos_token_id"),
])
def test_bad_metadata_raises_model_error(change, problem):
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": list(BYTE_CHARS),
          "tokenizer.ggml.merges": []}
    md.update(change)
    with pytest.raises(ModelError, match=problem):
        Tokenizer.from_metadata(md)
    with pytest.raises(ModelError, match="tokenizer.ggml.model missing"):
        Tokenizer.from_metadata({})


def test_bytes_missing_from_the_vocabulary_are_dropped_like_llamacpp():
    tokens = [c for c in BYTE_CHARS if c != BYTE_CHARS[0xF0]] + ["<unk>"]
    types = [TOKEN_NORMAL] * 255 + [2]
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                   "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                   "tokenizer.ggml.merges": [], "tokenizer.ggml.unknown_token_id": 255})
    ids = tok.encode("a🤖")
    assert [tok.tokens[i] for i in ids] == ["a", *(BYTE_CHARS[b] for b in "🤖".encode()[1:])]


# ---------------------------------------------------------------------------------------------------------
# SentencePiece (`llama`) with a model trained here
# ---------------------------------------------------------------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! How are you today?",
    "Machine learning is great; tokenizers are greater.",
    "Numbers like 12345 and 3.14159 appear too.",
    "  leading spaces and\ttabs\nnewlines  ",
    "café naïve résumé déjà vu, über straße",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
] * 30


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<tool>"], minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_pair(spm_model):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    return processor, Tokenizer.from_metadata(sentencepiece_metadata(spm_model))


SPM_STRINGS = ["Hello world", " Hello", "  two  spaces  ", "The quick brown fox 🦊 jumps", "日本語のテキスト", "a\nb\tc",
               "", " ", "x", "Numbers: 1234567890 -42", "don't stop", "ÜNÏCÖDÉ café", "<s>not special</s>",
               "zzzz qqqq", "emoji 🤖🚀 end", "trailing   "]


def test_sentencepiece_metadata_is_gguf_shaped(spm_model):
    md = sentencepiece_metadata(spm_model)
    assert md["tokenizer.ggml.model"] == "llama"
    assert len(md["tokenizer.ggml.tokens"]) == 400
    assert md["tokenizer.ggml.scores"].dtype == np.float32 and md["tokenizer.ggml.scores"].shape == (400,)
    assert md["tokenizer.ggml.token_type"].dtype == np.int32
    assert md["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert list(md["tokenizer.ggml.token_type"][:4]) == [2, 3, 3, 4]  # unknown, control, control, user-defined
    assert md["tokenizer.ggml.tokens"][4] == "<0x00>" and md["tokenizer.ggml.token_type"][4] == 6
    assert (md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.bos_token_id"],
            md["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
    assert md["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_ids_equal_the_library(spm_pair):
    processor, tok = spm_pair
    assert tok.model == "llama" and tok.bos_id == 1 and tok.eos_id == 2 and tok.add_bos and not tok.add_eos
    for text in SPM_STRINGS:
        expected = processor.EncodeAsIds(text)
        assert tok.encode(text, add_special=False) == expected, text
        assert tok.encode(text) == [1, *expected], text
        assert tok.decode(expected) == processor.DecodeIds(expected) == text


def test_sentencepiece_specials_and_byte_fallback(spm_pair):
    processor, tok = spm_pair
    assert tok.encode("<s>hi</s>", add_special=False, parse_special=True) == [
        1, *processor.EncodeAsIds("hi"), 2]  # each fragment gets its own dummy-prefix space, as in llama.cpp
    tool = tok.special_tokens["<tool>"]
    assert tok.encode("a<tool>b", add_special=False) == [*processor.EncodeAsIds("a"), tool, *processor.EncodeAsIds("b")]
    ids = tok.encode("🦊", add_special=False)
    assert [tok.tokens[i] for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x8A>"]
    assert tok.decode(ids) == "🦊"
    assert tok.decode([1, *processor.EncodeAsIds("Hi")]) == "<s> Hi"  # llama.cpp strips only the first token's space
    assert tok.decode([1, *processor.EncodeAsIds("Hi")], render_special=False) == " Hi"


@hyp
@given(mixed_text)
def test_sentencepiece_round_trip_and_stream(spm_pair, text):
    processor, tok = spm_pair
    ids = tok.encode(text, add_special=False)
    if "<tool>" not in text:
        assert ids == processor.EncodeAsIds(text)
    assume("\u2581" not in text)  # a literal U+2581 decodes as a space, in SentencePiece and llama.cpp alike
    assert tok.decode(ids) == text
    stream = tok.detokenizer()
    assert "".join(stream.add(i) for i in ids) + stream.flush() == text


def test_from_sentencepiece_file(spm_model, spm_pair, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(spm_model)
    tok = Tokenizer.from_sentencepiece_file(path)
    assert tok.encode("Hello world") == spm_pair[1].encode("Hello world")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="bad.model"):
        Tokenizer.from_sentencepiece_file(tmp_path / "bad.model")


# ---------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_megabyte_of_english_round_trips(smollm):
    """Throughput is measured in benchmarks/bench_tokenizer.py; here the same text must round-trip."""
    text = english_corpus(1_000_000)
    assert smollm.decode(smollm.encode(text)) == text
