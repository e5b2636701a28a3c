// Byte-level BPE trainer: learns merges on text pre-split exactly as Tokenizer::encode splits it
// (reserved special tokens cut out, NFC, the Qwen2 regex) and writes a HF tokenizer.json that both
// opdlm::io::Tokenizer and HF tokenizers load (tests/tokenizer/train_ref_check.sh checks the latter).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "opdlm/io/tokenizer.hpp"

namespace opdlm::io {

// The Qwen2/Qwen3 pre-split regex (the Split step of their tokenizer.json).
inline constexpr std::string_view kQwen2PreSplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct BpeTrainerOptions {
  // Size of the resulting vocabulary: 256 byte tokens + merged tokens + special tokens.
  int32_t vocab_size = 0;
  // A pair must occur at least this often (weighted by word counts) to be merged; training stops
  // at the first best pair below it, so the vocabulary can come out smaller than vocab_size.
  int64_t min_frequency = 2;
  // Added special tokens, given the ids right after the merged tokens, in this order.
  std::vector<std::string> special_tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"};
};

struct BpeTrainStats {
  int64_t bytes = 0;         // text bytes seen
  int64_t pre_tokens = 0;    // words counted (with repeats)
  int64_t unique_words = 0;  // distinct pre-tokens
  int32_t merges = 0;        // merges learned
  int32_t vocab_size = 0;    // final vocabulary size, special tokens included
};

// Algorithm: ids 0..255 are the byte-level alphabet in code-point order (the GPT-2 / Qwen order);
// each step merges the adjacent pair with the highest count, counts weighted by word frequency.
// Ties go to the smaller (left id, right id) pair, i.e. to the pair of older tokens (the rule of
// HF's BpeTrainer), so the result depends only on the multiset of pre-tokens, not on input order or
// hash-table iteration. A merge whose string already exists reuses that token's id, as HF does.
class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainerOptions options);

  // Counts the pre-tokens of one document (valid UTF-8; Error with the byte offset otherwise).
  void add_text(std::string_view text);
  // add_text on a whole file; errors name the file.
  void add_file(const std::string& path);

  // Learns the merges and returns the tokenizer.json text; `stats` (optional) gets the figures.
  std::string train_json(BpeTrainStats* stats = nullptr) const;
  // train_json loaded as a Tokenizer (save() it to write the file).
  Tokenizer train(BpeTrainStats* stats = nullptr) const;

 private:
  BpeTrainerOptions options_;
  Tokenizer splitter_;  // byte alphabet only: used for its added-token split, NFC and regex
  std::unordered_map<std::string, int64_t> words_;
  int64_t bytes_ = 0, pre_tokens_ = 0;
};

}  // namespace opdlm::io
