"""Tokenizers built from GGUF metadata: `gpt2` byte-level BPE and `llama` SentencePiece.

Ids follow llama.cpp's rules (llama-vocab.cpp), so a prompt tokenized here gives the model the ids it would get
there:

* **Special tokens.** Token types follow GGUF/SentencePiece: 1 normal, 2 unknown, 3 control, 4 user-defined,
  5 unused, 6 byte. Before the text reaches BPE/SentencePiece it is cut at the special tokens' texts, longest
  text first over the whole string (not leftmost-longest: with `ab` and `bcd`, "abcd" gives "a" + `bcd`).
  Control and unknown tokens are cut only with `parse_special=True`; user-defined tokens always, as llama.cpp
  does. Tokens whose text marks an end of generation (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`...) are
  treated as control tokens and join `eog_ids`.
* **gpt2.** The text is split by the pre-tokenizer regex named by `tokenizer.ggml.pre`, each piece is mapped
  byte by byte to printable characters (the GPT-2 byte map) and merged pair by pair, lowest merge rank first
  and leftmost first among equal ranks. `llama3`-family pre-tokenizers take a piece that is a whole token
  as is ("ignore merges"). A byte whose character is not in the vocabulary is dropped, as llama.cpp does
  (SmolLM2 lacks a few control bytes and the lead bytes of unassigned Unicode planes). The C++ encoder of
  cpp/bpe.h (`_core.BpeEncoder`) does this work when the compiled core has it (families gpt2, smollm, llama3,
  qwen2; REALIZAR_PY_TOKENIZER=1 forces Python); the Python code here is its reference.
* **llama (SentencePiece).** The GGUF vocabulary is turned into a SentencePiece BPE ModelProto (identity
  normalization, spaces kept and escaped as U+2581, `add_dummy_prefix` from `add_space_prefix`, byte
  fallback when all 256 `<0xXX>` tokens exist). Each text fragment between special tokens is encoded
  separately and, like llama.cpp, gets its own dummy-prefix space.
* **BOS/EOS.** Added when `add_special` and the metadata's add_bos/add_eos say so (gpt2 default: no BOS,
  except the llama3 family; llama default: BOS).
* Lone surrogates in the text (no UTF-8 exists for them) are encoded as U+FFFD.

Decoding renders each token as bytes (`token_to_piece`) and the joined bytes as UTF-8 with errors='replace':
normal byte-level tokens through the inverse byte map, SentencePiece pieces with U+2581 as a space, byte
tokens as their byte, user-defined and unknown tokens as their text, control tokens as their text when
`render_special` (the default, so that `decode(encode(x, parse_special=True)) == x`) and as nothing otherwise
(llama.cpp's `special=false`, what llama-server streams by default). When `add_space_prefix` is set, one
leading space of the first token is dropped, as llama.cpp's detokenizer does. llama.cpp's `clean_spaces`
post-processing (for gpt2 vocabularies of older pre-tokenizer types) is not applied: decoding stays the exact
inverse of encoding.
"""
from __future__ import annotations

import codecs
import heapq
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

from .errors import ModelError

__all__ = [
    "Tokenizer",
    "Detokenizer",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_CONTROL",
    "TOKEN_USER_DEFINED",
    "TOKEN_UNUSED",
    "TOKEN_BYTE",
    "PRE_TOKENIZER_REGEXES",
    "sentencepiece_metadata",
    "bytes_to_unicode",
]

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Texts that llama.cpp treats as end-of-generation tokens whatever their declared type.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

_SPACE_ESCAPE = "\u2581"  # SentencePiece's visible space
_SURROGATES = regex.compile("[\ud800-\udfff]")

# ---------------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes. Each entry is a list of stages: a stage splits every piece of the previous stage at
# its matches, keeping the unmatched text between matches as pieces too (llama.cpp's unicode_regex_split).
# ---------------------------------------------------------------------------------------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
}

# One-pass equivalents (the same pieces, for speed: `findall` over the whole text instead of staged
# `finditer`). The only text the staged split leaves unmatched is a single whitespace character before a
# non-space (e.g. "\n" before a word), which the trailing `|\s` now matches alone; in `smollm` the first
# stage cuts every digit out, so the whitespace lookahead must treat a digit as the end of the piece.
_FUSED: dict[str, str] = {
    "gpt2": _GPT2 + r"|\s",
    "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s",
    "llama3": _LLAMA3,
    "qwen2": _QWEN2,
}

# families the C++ encoder implements (cpp/bpe.cpp)
_NATIVE_FAMILIES = frozenset({"gpt2", "smollm", "llama3", "qwen2"})

# tokenizer.ggml.pre value -> (regex family, ignore_merges, add_bos default), as in llama-vocab.cpp.
_PRE_TYPES: dict[str, tuple[str, bool, bool]] = {}
for _names, _entry in (
    (("default",), ("default", False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ("llama3", True, True)),
    (("dbrx", "smaug-bpe"), ("llama3", False, False)),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
      "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4", "trillion",
      "granite-docling"), ("gpt2", False, False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), ("smollm", False, False)),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo", "f2llmv2"), ("qwen2", False, False)),
):
    for _name in _names:
        _PRE_TYPES[_name] = _entry


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte map: byte b -> a printable character (bytes that print as themselves keep their code)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# str.translate table: latin-1 character (= raw byte) -> its byte-level character
_BYTE_TRANSLATE = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}


def _utf8(text: str) -> bytes:
    # GGUF strings that were not valid UTF-8 arrive with surrogate escapes (see realizar.gguf).
    return text.encode("utf-8", "surrogateescape")


def _split_staged(text: str, stages: Sequence[regex.Pattern]) -> list[str]:
    """llama.cpp's staged split: each stage cuts every piece at its matches, keeping the gaps as pieces."""
    pieces = [text]
    for pattern in stages:
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for m in pattern.finditer(piece):
                start, end = m.span()
                if start > pos:
                    out.append(piece[pos:start])
                if end > start:
                    out.append(piece[start:end])
                pos = end
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


# ---------------------------------------------------------------------------------------------------------
# Encoders: turn one raw-text fragment (no special tokens in it) into ids.
# ---------------------------------------------------------------------------------------------------------

def _native_bpe_class() -> Any:
    """The C++ encoder (cpp/bpe.h) when the compiled core has it; REALIZAR_PY_TOKENIZER=1 forces Python."""
    if os.environ.get("REALIZAR_PY_TOKENIZER", "") not in ("", "0"):
        return None
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(_core, "BpeEncoder", None)


class _ByteLevelBPE:
    """gpt2-style byte-level BPE with a per-piece cache (English text is mostly repeated pieces).

    The C++ encoder (same rules, ~10x faster) does the work when the compiled core provides it and the
    pre-tokenizer family is one it implements; this class is then the reference the tests hold it to.
    """

    CACHE_MAX_ENTRIES = 200_000
    CACHE_MAX_PIECE = 64  # longer pieces (long whitespace runs, base64...) are not worth keeping

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], pre: str):
        if pre not in _PRE_TYPES:
            known = ", ".join(sorted(_PRE_TYPES))
            raise ModelError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {known})")
        family, self.ignore_merges, _ = _PRE_TYPES[pre]
        self.pre = pre
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self.token_to_id[t] = i  # later duplicates win, as in llama.cpp
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            cut = merge.find(" ", 1)
            if cut < 0:
                raise ModelError(f"tokenizer.ggml.merges[{rank}] {merge!r} is not two tokens separated by a space")
            self.ranks.setdefault((merge[:cut], merge[cut + 1:]), rank)
        self.stages = [regex.compile(p) for p in PRE_TOKENIZER_REGEXES[family]]
        self.fused = regex.compile(_FUSED[family]) if family in _FUSED else None
        self.cache: dict[str, list[int]] = {}
        native = _native_bpe_class()
        self.native = None
        if native is not None and family in _NATIVE_FAMILIES:
            self.native = native([_utf8(t) for t in tokens], [_utf8(m) for m in merges], family, self.ignore_merges)

    def pre_tokenize(self, text: str) -> list[str]:
        if self.fused is not None:
            return self.fused.findall(text)
        return _split_staged(text, self.stages)

    def encode(self, text: str) -> list[int]:
        if self.native is not None:
            return self.native.encode(text)
        return self.encode_python(text)

    def encode_python(self, text: str) -> list[int]:
        cache = self.cache
        out: list[int] = []
        for piece in self.pre_tokenize(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self.encode_piece(piece)
                if len(piece) <= self.CACHE_MAX_PIECE:
                    if len(cache) >= self.CACHE_MAX_ENTRIES:
                        cache.clear()
                    cache[piece] = ids
            out += ids
        return out

    def encode_piece(self, piece: str) -> list[int]:
        word = _utf8(piece).decode("latin-1").translate(_BYTE_TRANSLATE)
        vocab = self.token_to_id
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        symbols = self.merge(word)
        out: list[int] = []
        for sym in symbols:
            tid = vocab.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            # No token for the symbol (a vocabulary without some byte characters, such as SmolLM2's, which
            # lacks a few control bytes and the UTF-8 lead bytes of unassigned planes): like llama.cpp, each
            # byte of the symbol's text that is itself a one-character token, the others dropped. (`unk` is
            # not used: in byte-level vocabularies it is usually <|endoftext|>, an end-of-generation token.)
            for b in sym.encode("utf-8"):
                if b < 0x80:
                    tid = vocab.get(chr(b))
                    if tid is not None:
                        out.append(tid)
        return out

    def merge(self, word: str) -> list[str]:
        """Apply merges: the adjacent pair of lowest rank first, the leftmost among equal ranks."""
        if len(word) > 48:
            return self._merge_heap(word)
        symbols = list(word)
        ranks = self.ranks
        while len(symbols) > 1:
            best_rank = -1
            best_i = -1
            left = symbols[0]
            for i in range(1, len(symbols)):
                right = symbols[i]
                r = ranks.get((left, right))
                if r is not None and (best_rank < 0 or r < best_rank):
                    best_rank = r
                    best_i = i - 1
                left = right
            if best_i < 0:
                break
            symbols[best_i:best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
        return symbols

    def _merge_heap(self, word: str) -> list[str]:
        # Same order as `merge`, O(n log n) for long pieces: symbols in a linked list, candidate pairs in a
        # heap keyed by (rank, left position); a popped pair is skipped when either side has changed since.
        text = list(word)
        n = len(text)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        ranks = self.ranks
        heap: list[tuple[int, int, int, str, str]] = []

        def push(i: int, j: int) -> None:
            if i >= 0 and j < n:
                r = ranks.get((text[i], text[j]))
                if r is not None:
                    heapq.heappush(heap, (r, i, j, text[i], text[j]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, j, a, b = heapq.heappop(heap)
            if not (alive[i] and alive[j]) or text[i] != a or text[j] != b:
                continue
            text[i] = a + b
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(prv[i], i)
            push(i, nxt[i])
        return [text[i] for i in range(n) if alive[i]]


class _SentencePieceEncoder:
    """SentencePiece BPE over the GGUF vocabulary, through the sentencepiece library."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                 unk_id: int | None, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 add_space_prefix: bool):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2 as pb

        model = pb.ModelProto()
        byte_pieces = 0
        unknown_seen = False
        for i, (text, score, ttype) in enumerate(zip(tokens, scores, types, strict=True)):
            piece = model.pieces.add()
            try:
                piece.piece = text
            except (TypeError, ValueError):  # protobuf strings must be valid UTF-8
                raise ModelError(f"llama vocabulary token {i} {text!r} is not valid UTF-8") from None
            piece.score = float(score)
            if ttype == TOKEN_UNKNOWN and not unknown_seen:
                piece.type = pb.ModelProto.SentencePiece.UNKNOWN
                unknown_seen = True
            elif ttype in (TOKEN_UNKNOWN, TOKEN_CONTROL):
                piece.type = pb.ModelProto.SentencePiece.CONTROL
            elif ttype == TOKEN_USER_DEFINED:
                piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
            elif ttype == TOKEN_UNUSED:
                piece.type = pb.ModelProto.SentencePiece.UNUSED
            elif ttype == TOKEN_BYTE:
                piece.type = pb.ModelProto.SentencePiece.BYTE
                byte_pieces += 1
            else:
                piece.type = pb.ModelProto.SentencePiece.NORMAL
        if not unknown_seen:
            # SentencePiece needs exactly one unknown piece; take the declared unk id.
            if unk_id is None or not 0 <= unk_id < len(tokens):
                raise ModelError("llama vocabulary has no unknown token (token_type 2 or tokenizer.ggml.unknown_token_id)")
            model.pieces[unk_id].type = pb.ModelProto.SentencePiece.UNKNOWN
        spec = model.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.vocab_size = len(tokens)
        spec.byte_fallback = byte_pieces == 256
        for field, value in (("unk_id", unk_id), ("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            setattr(spec, field, value if value is not None else -1)
        norm = model.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = bool(add_space_prefix)
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        self.proto = model
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model.SerializeToString())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message
            raise ModelError(f"cannot build a SentencePiece model from the llama vocabulary: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.processor.EncodeAsIds(text)


# ---------------------------------------------------------------------------------------------------------
# Metadata helpers
# ---------------------------------------------------------------------------------------------------------

def _scalar(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = md.get(key, default)
    if value is None:
        return default
    if hasattr(value, "tolist"):  # numpy scalar or 1-element array
        value = value.tolist()
        if isinstance(value, list):
            if len(value) != 1:
                raise ModelError(f"{key}: expected a single value, got {len(value)}")
            value = value[0]
    return value


def _token_id(md: Mapping[str, Any], key: str, n_vocab: int, default: int | None) -> int | None:
    value = _scalar(md, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{key}: expected a token id, got {value!r}")
    if value < 0 or value == 0xFFFFFFFF:  # -1 (or its uint32 form) means "none"
        return None
    if value >= n_vocab:
        raise ModelError(f"{key}={value} is outside the vocabulary of {n_vocab} tokens")
    return value


def _flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _scalar(md, key, default)
    if not isinstance(value, (bool, int)):
        raise ModelError(f"{key}: expected a boolean, got {value!r}")
    return bool(value)


def _string_list(md: Mapping[str, Any], key: str) -> list[str]:
    value = md.get(key)
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"{key}: expected an array of strings")
    return list(value)


def _number_list(md: Mapping[str, Any], key: str, n: int, default: float, kind: type) -> list:
    value = md.get(key)
    if value is None:
        return [kind(default)] * n
    values = value.tolist() if hasattr(value, "tolist") else list(value)
    if len(values) != n:
        raise ModelError(f"{key} has {len(values)} entries for {n} tokens")
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise ModelError(f"{key}: expected an array of numbers") from None


def sentencepiece_metadata(model: bytes | Any) -> dict[str, Any]:
    """GGUF-style tokenizer metadata (as `GGUFFile.metadata` holds it) from a SentencePiece model.

    `model` is a serialized ModelProto (the bytes of a `tokenizer.model`) or a parsed ModelProto. Pieces,
    scores and piece types are stored as the GGUF converter writes them (types keep SentencePiece's numbers,
    which are GGUF's).
    """
    import numpy as np
    from sentencepiece import sentencepiece_model_pb2 as pb

    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except Exception as e:
            raise ModelError(f"not a SentencePiece model: {e}") from None
    else:
        proto = model
    if len(proto.pieces) == 0:
        raise ModelError("SentencePiece model has no pieces")
    spec = proto.trainer_spec
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": np.array([p.score for p in proto.pieces], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([p.type for p in proto.pieces], dtype=np.int32),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    for key, value in (("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id),
                       ("unknown_token_id", spec.unk_id), ("padding_token_id", spec.pad_id)):
        if 0 <= value < len(proto.pieces):
            md[f"tokenizer.ggml.{key}"] = int(value)
    return md


# ---------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one model. Build it with `from_metadata` or `from_sentencepiece_file`."""

    def __init__(self, *, model: str, tokens: list[str], token_types: list[int], encoder: Any,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None, pad_id: int | None,
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, eog_ids: set[int],
                 chat_template: str | None = None, pre: str | None = None):
        self.model = model
        self.pre = pre
        self.tokens = tokens
        self.token_types = token_types
        self._encoder = encoder
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.eog_ids = frozenset(eog_ids)
        self.chat_template = chat_template
        # text -> id of every token cut out of the text before BPE/SentencePiece
        self.special_tokens: dict[str, int] = {}
        for i, (text, ttype) in enumerate(zip(tokens, token_types, strict=True)):
            if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and text:
                self.special_tokens.setdefault(text, i)
        by_length = sorted(self.special_tokens.items(), key=lambda kv: (-len(kv[0]), kv[1]))
        self._specials_all = by_length
        self._specials_user = [(t, i) for t, i in by_length if token_types[i] == TOKEN_USER_DEFINED]
        self._pieces: list[bytes] | None = None
        self._pieces_plain: list[bytes] | None = None
        # Built on first use (~0.1 s for a 49k vocabulary): under a lock, so that concurrent first requests
        # build it once instead of each building its own copy while holding the GIL in turn.
        self._pieces_lock = threading.Lock()

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (`GGUFFile.metadata`: strings as str, arrays as lists or numpy arrays)."""
        model = _scalar(md, "tokenizer.ggml.model")
        if model is None:
            raise ModelError("no tokenizer in the metadata (tokenizer.ggml.model missing)")
        tokens = _string_list(md, "tokenizer.ggml.tokens")
        if not tokens:
            raise ModelError("tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        types = _number_list(md, "tokenizer.ggml.token_type", n, TOKEN_NORMAL, int)
        template = _scalar(md, "tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelError("tokenizer.chat_template: expected a string")

        if model == "gpt2":
            pre = _scalar(md, "tokenizer.ggml.pre") or "default"
            if not isinstance(pre, str):
                raise ModelError("tokenizer.ggml.pre: expected a string")
            bos_default = eos_default = unk_default = None
            add_bos_default = _PRE_TYPES.get(pre, (None, False, False))[2]
            add_space_default = False
        elif model == "llama":
            pre = None
            # llama.cpp's SentencePiece defaults, where the vocabulary is large enough to hold them
            bos_default, eos_default, unk_default = (d if d < n else None for d in (1, 2, 0))
            add_bos_default = True
            add_space_default = True
        else:
            raise ModelError(f"unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)")

        bos_id = _token_id(md, "tokenizer.ggml.bos_token_id", n, bos_default)
        eos_id = _token_id(md, "tokenizer.ggml.eos_token_id", n, eos_default)
        unk_id = _token_id(md, "tokenizer.ggml.unknown_token_id", n, unk_default)
        pad_id = _token_id(md, "tokenizer.ggml.padding_token_id", n, None)
        add_bos = _flag(md, "tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = _flag(md, "tokenizer.ggml.add_eos_token", False)
        add_space_prefix = _flag(md, "tokenizer.ggml.add_space_prefix", add_space_default)
        if add_bos and bos_id is None:
            raise ModelError("the tokenizer adds a BOS token but has no tokenizer.ggml.bos_token_id")
        if add_eos and eos_id is None:
            raise ModelError("the tokenizer adds an EOS token but has no tokenizer.ggml.eos_token_id")

        eog = {eos_id} if eos_id is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            tid = _token_id(md, key, n, None)
            if tid is not None:
                eog.add(tid)
        for i, text in enumerate(tokens):
            if text in EOG_TEXTS:
                eog.add(i)
                types[i] = TOKEN_CONTROL  # llama.cpp overrides the type of control-looking tokens too

        if model == "gpt2":
            encoder: Any = _ByteLevelBPE(tokens, _string_list(md, "tokenizer.ggml.merges"), pre)
        else:
            scores = _number_list(md, "tokenizer.ggml.scores", n, 0.0, float)
            encoder = _SentencePieceEncoder(tokens, scores, types, unk_id, bos_id, eos_id, pad_id, add_space_prefix)
        return cls(model=model, pre=pre, tokens=tokens, token_types=types, encoder=encoder,
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_space_prefix, eog_ids=eog, chat_template=template)

    @classmethod
    def from_sentencepiece_file(cls, path: str | Any) -> Tokenizer:
        """Build from a SentencePiece `tokenizer.model` file."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            md = sentencepiece_metadata(data)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None
        return cls.from_metadata(md)

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)})")

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS as the model asks, `parse_special` turns the text
        of control tokens (`<|im_start|>`...) into those tokens (user-defined tokens always are)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates have no UTF-8: they become U+FFFD
                text = _SURROGATES.sub("\ufffd", text)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        encode = self._encoder.encode
        for fragment in self._partition(text, parse_special):
            if type(fragment) is int:
                out.append(fragment)
            else:
                out += encode(fragment)
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut `text` at special-token texts, longest token first (llama.cpp's tokenizer_st_partition)."""
        if not text:
            return []
        specials = self._specials_all if parse_special else self._specials_user
        fragments: list[str | int] = [text]
        for token_text, token_id in specials:
            if token_text not in text:
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if type(fragment) is int or token_text not in fragment:
                    cut.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(token_text)):  # type: ignore[union-attr]
                    if k:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    # -- decoding -------------------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, render_special: bool = True) -> bytes:
        """The bytes token `token_id` stands for (control tokens: their text, or b'' unless render_special)."""
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self.tokens)} tokens")
        return self._piece_table(render_special)[token_id]

    def _piece_table(self, render_special: bool) -> list[bytes]:
        table = self._pieces if render_special else self._pieces_plain
        if table is not None:
            return table
        with self._pieces_lock:
            table = self._pieces if render_special else self._pieces_plain
            if table is None:
                table = [self._render(i, render_special) for i in range(len(self.tokens))]
                if render_special:
                    self._pieces = table
                else:
                    self._pieces_plain = table
        return table

    def _render(self, token_id: int, render_special: bool) -> bytes:
        text = self.tokens[token_id]
        ttype = self.token_types[token_id]
        if ttype == TOKEN_CONTROL:
            return _utf8(text) if render_special else b""
        if ttype in (TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            return _utf8(text)
        if self.model == "gpt2":
            if ttype != TOKEN_NORMAL:
                return b""
            # characters outside the byte map (not expected in a byte-level vocabulary) pass through as UTF-8
            return b"".join(bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else _utf8(c) for c in text)
        if ttype == TOKEN_BYTE:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                try:
                    return bytes((int(text[3:5], 16),))
                except ValueError:
                    pass
            return _utf8(text)
        if ttype == TOKEN_UNUSED:
            return b""
        return _utf8(text.replace(_SPACE_ESCAPE, " "))

    def decode_bytes(self, ids: Iterable[int], render_special: bool = True) -> bytes:
        """The raw bytes of `ids` (possibly ending inside a UTF-8 character)."""
        table = self._piece_table(render_special)
        n = len(table)
        pieces = []
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i!r} is outside the vocabulary of {n} tokens")
            pieces.append(table[i])
        if self.add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # llama.cpp drops one leading space of the first token only
        return b"".join(pieces)

    def decode(self, ids: Iterable[int], render_special: bool = True) -> str:
        """Text of `ids`; invalid or incomplete UTF-8 becomes U+FFFD. See the module docstring for the rules."""
        return self.decode_bytes(list(ids), render_special).decode("utf-8", "replace")

    def detokenizer(self, render_special: bool = True, strip_space_prefix: bool | None = None) -> Detokenizer:
        """A streaming decoder: `.add(id)` returns the newly completed text, `.flush()` the rest.

        `strip_space_prefix` (default: the model's add_space_prefix, as `decode`) drops one leading space
        of the first token; pass False when streaming a continuation of an earlier text.
        """
        if strip_space_prefix is None:
            strip_space_prefix = self.add_space_prefix
        return Detokenizer(self, render_special, strip_space_prefix)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """`messages` rendered with the model's chat template (ChatML when it has none)."""
        from .chat import render_chat

        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos, **extra)


class Detokenizer:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    The concatenation of every `add` result and `flush()` equals `Tokenizer.decode` of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, render_special: bool = True, strip_space_prefix: bool = False):
        self._table = tokenizer._piece_table(render_special)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_space_prefix
        self._first = True

    def add(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._table):
            raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self._table)} tokens")
        piece = self._table[token_id]
        if self._first:
            self._first = False
            if self._strip and piece.startswith(b" "):
                piece = piece[1:]
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); the stream may go on after it."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
