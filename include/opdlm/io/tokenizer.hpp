// Byte-level BPE tokenizer that loads a Hugging Face `tokenizer.json` and reproduces HF tokenizers
// (Rust) ids exactly for the Qwen2/Qwen3 and GPT-2 families: added tokens split out of the raw text,
// NFC, PCRE2 pre-split, byte-level alphabet, merges by rank. Decoding goes through the byte-level
// decoder. docs: shared/docs/data.md section 3 (reference assets), tests/tokenizer/ (differential test).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace opdlm::io {

// Supported tokenizer.json subset (anything else is an opdlm::Error naming the file and field):
//   model: BPE (vocab object; merges as "a b" strings or [a, b] pairs; ignore_merges; byte_fallback;
//          unk_token/fuse_unk; dropout null; empty continuing_subword_prefix / end_of_word_suffix)
//   normalizer: null, NFC, NFD, NFKC, NFKD or a Sequence of these (utf8proc)
//   pre_tokenizer: Sequence of Split (Regex or String pattern, any behaviour, invert) and ByteLevel
//          (add_prefix_space, use_regex = GPT-2 regex); a ByteLevel step is required
//   decoder: ByteLevel (or a Sequence containing only ByteLevel)
//   added_tokens: special or not, normalized or not, lstrip/rstrip/single_word
//   post_processor, truncation, padding: kept for save(), otherwise ignored (no BOS/EOS is added).
//
// Invalid UTF-8 passed to encode() is an opdlm::Error naming the byte offset: the text never reaches
// the model altered silently (HF tokenizers only accepts valid UTF-8 strings, so there is no
// reference behaviour to copy). Decoding ids that end inside a UTF-8 sequence gives U+FFFD like
// Rust's String::from_utf8_lossy, as HF does.
//
// Thread safety: every const member may be called from several threads at once (the pre-token cache
// is locked). Copies are cheap and share the immutable tables and the cache.
class Tokenizer {
 public:
  // Loads a HF tokenizers JSON file (model.type BPE, byte-level).
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  // Same, from the JSON text; `source_name` names the input in error messages.
  static Tokenizer from_json_string(std::string_view json_text, const std::string& source_name);

  // NFC (per the normalizer) is applied after added/special tokens are matched in the raw text;
  // no BOS/EOS is added (HF encode with add_special_tokens=false).
  std::vector<int32_t> encode(std::string_view text) const;
  // Special tokens are kept as their text. Ids without a token are skipped, as HF does (a model's
  // padded embedding rows, e.g. Qwen3's 151,669..151,935, decode to nothing).
  std::string decode(std::span<const int32_t> ids) const;
  // Max id + 1, including added tokens (Qwen3: 151,669).
  int32_t vocab_size() const;
  // Added tokens first, then the model vocabulary (as HF token_to_id).
  std::optional<int32_t> token_id(std::string_view token) const;
  // The token's vocabulary string (byte-level alphabet for model tokens); Error for unknown ids.
  std::string id_to_token(int32_t id) const;
  // Writes the same tokenizer.json format (vocab by id; merges in the format that was read).
  void save(const std::string& path) const;

  // True when `id` is an added token marked special (<|im_end|>, <|MASK|>, ...).
  bool is_special(int32_t id) const;
  // Calls f with every pre-token encode() would pass to BPE (after the added-token split,
  // normalisation and pre-split; UTF-8, before the byte-level mapping). Added tokens are left out.
  // The BPE trainer counts these, so training and encoding split text the same way.
  void for_each_pretoken(std::string_view text, const std::function<void(std::string_view)>& f) const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// NFC of valid UTF-8 through utf8proc (the normalisation encode() applies); Error on invalid UTF-8.
std::string nfc(std::string_view text);

// GPT-2's byte -> printable-char map (bytes_to_unicode), as the UTF-8 of that char.
const std::string& byte_level_char(uint8_t byte);

}  // namespace opdlm::io
