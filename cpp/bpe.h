// Byte-level BPE encoding (GPT-2 style vocabularies: SmolLM, Qwen2, Llama 3...): the pre-tokenizer, the merge
// loop and a per-piece cache. The fast path of realizar.tokenizer's `gpt2` tokenizer; plain C++, no Python.
//
// Same rules as the Python reference (python/realizar/tokenizer.py), which follow llama.cpp:
//   * pre-tokenizer: the regex family named by tokenizer.ggml.pre, written out as a hand scanner over code
//     points (\p{L} and \p{N} from the tables in bpe.cpp, \s = Unicode White_Space);
//   * each piece's bytes start as one symbol each (GPT-2's byte -> character map); the adjacent pair with the
//     lowest merge rank is merged first, the leftmost among equal ranks, until no pair has a rank;
//   * a symbol that is not a token becomes the one-character tokens of its ASCII bytes, the rest dropped.
// Special tokens are cut out by the caller before text reaches encode().
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rz {

enum class PreTokenizer {
    Gpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
    Smollm,  // every \p{N} alone, then Gpt2 on the text between digits
    Llama3,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    Qwen2,   // as Llama3 with \p{N} instead of \p{N}{1,3}
};

// "gpt2" | "smollm" | "llama3" | "qwen2" (the family names of realizar.tokenizer); throws std::invalid_argument.
PreTokenizer parse_pre_tokenizer(const std::string& name);

// Splits UTF-8 `text` into pre-tokenizer pieces; returns [begin, end) byte offsets. Invalid UTF-8 bytes count as
// one code point each, of no class (neither letter, number nor space).
std::vector<std::pair<size_t, size_t>> pre_tokenize(std::string_view text, PreTokenizer pre);

class BpeEncoder {
public:
    // tokens: the vocabulary as GGUF stores it (GPT-2 byte-level alphabet, UTF-8; id = index, a later duplicate
    // wins); merges: "left right" (split at the first space after the first character), rank = index, the first
    // of duplicates wins. ignore_merges: a piece that is a whole token is taken as is (the llama3 family).
    // Throws std::invalid_argument on a merge without a separator.
    BpeEncoder(const std::vector<std::string>& tokens, const std::vector<std::string>& merges, PreTokenizer pre,
               bool ignore_merges);

    // Token ids of UTF-8 `text` (raw text, no special tokens in it). Thread-safe.
    std::vector<int32_t> encode(std::string_view text) const;

    // Token ids of one pre-tokenized piece (raw bytes), without the cache.
    void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

    size_t vocab_size() const { return n_vocab_; }

private:
    struct Merge {
        int32_t rank;
        int32_t result;  // symbol id of left+right
    };

    int32_t symbol_of(const std::string& text);  // token id, or a new id >= n_vocab for a text that is no token
    void merge_symbols(std::vector<int32_t>& syms) const;

    PreTokenizer pre_;
    bool ignore_merges_;
    size_t n_vocab_ = 0;
    std::unordered_map<std::string, int32_t> symbol_ids_;  // byte-level text -> symbol id
    std::vector<std::string> symbol_texts_;                // symbol id -> byte-level text
    std::unordered_map<std::string, int32_t> raw_tokens_;  // raw bytes -> token id (for ignore_merges)
    std::unordered_map<uint64_t, Merge> merges_;           // (left symbol << 32 | right symbol) -> merge
    int32_t byte_symbol_[256];

    static constexpr size_t kCacheMaxEntries = 200000;
    static constexpr size_t kCacheMaxPiece = 64;  // bytes; longer pieces (whitespace runs, base64) are not kept
    mutable std::mutex cache_mutex_;
    mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace rz
