// Token shards: the pre-tokenized training corpus on disk (format in docs/data_formats.md). A shard
// holds documents (token-id runs) of one tokenizer, with a CRC32C over the payload; the reader
// validates every field before it allocates, so a corrupt or hostile file fails with a named error.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "opdlm/io/hash.hpp"

namespace opdlm::io {

// On-disk token width; chosen by vocabulary size (u16 when every id fits in 16 bits).
enum class TokenDType : uint32_t { u16 = 2, u32 = 4 };
TokenDType token_dtype_for_vocab(int64_t vocab_size);

struct TokenShardLimits {
  // Hard caps checked before any allocation (a shard is a slice of a corpus, not the corpus).
  static constexpr uint64_t kMaxTokens = uint64_t{1} << 36;     // 64 Gi tokens
  static constexpr uint64_t kMaxDocuments = uint64_t{1} << 32;  // 4 Gi documents
  static constexpr int64_t kMaxVocab = int64_t{1} << 31;        // ids are int32
};

class TokenShard {
 public:
  // An empty shard for a tokenizer with `vocab_size` ids; `tokenizer_sha256` is the sha256 of its
  // tokenizer.json, so a trainer can refuse shards made with another tokenizer.
  TokenShard(int64_t vocab_size, const Sha256Digest& tokenizer_sha256);

  // Appends one document; every id must be in [0, vocab_size). Empty documents are allowed.
  void add_document(std::span<const int32_t> ids);

  int64_t vocab_size() const { return vocab_size_; }
  const Sha256Digest& tokenizer_sha256() const { return tokenizer_sha256_; }
  TokenDType dtype() const { return token_dtype_for_vocab(vocab_size_); }
  uint64_t num_documents() const { return offsets_.size() - 1; }
  uint64_t num_tokens() const { return tokens_.size(); }
  std::span<const int32_t> document(uint64_t i) const;
  // All tokens in document order, and the n_docs + 1 boundaries (offsets[0] = 0, last = n_tokens).
  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::vector<uint64_t>& offsets() const { return offsets_; }

  // Writes to `path` atomically (a temp file beside it, then rename), so readers never see half a
  // shard and an interrupted write leaves the old file.
  void write(const std::string& path) const;
  // Reads and validates: magic, version, dtype, counts vs limits and file size, header and payload
  // CRC32C, offsets monotone, ids below vocab_size. Errors name the file and the header field.
  static TokenShard read(const std::string& path);

  // The same documents in the order of shuffle_permutation(num_documents(), seed, epoch).
  TokenShard shuffled(uint32_t seed, uint32_t epoch) const;

  bool operator==(const TokenShard&) const = default;

 private:
  int64_t vocab_size_;
  Sha256Digest tokenizer_sha256_;
  std::vector<int32_t> tokens_;
  std::vector<uint64_t> offsets_{0};
};

// A permutation of [0, n) by Fisher-Yates, drawing with CounterRng::Cursor::below from the key
// (seed, RngPurpose::data_shuffle, step = epoch, sample 0, position 0): the same on every machine
// and every process layout, and a new order each epoch. n must be < 2^32.
std::vector<uint64_t> shuffle_permutation(uint64_t n, uint32_t seed, uint32_t epoch);

// How `opdlm data prepare` cuts an input file into documents.
enum class DocFormat {
  lines,       // each non-blank line
  paragraphs,  // blocks separated by blank lines (inner newlines kept)
  text,        // the whole file
  jsonl,       // the string field `jsonl_field` of each object line ({"_header": ...} lines skipped)
};
DocFormat parse_doc_format(std::string_view name);  // "lines", "paragraphs", "text", "jsonl"
// Splits one file's content; `keep_newlines` keeps the newline that ends each line / paragraph.
// CR before LF is dropped. Errors name `source`:line (and the field for JSONL).
std::vector<std::string> split_documents(std::string_view content, DocFormat format, const std::string& jsonl_field,
                                         bool keep_newlines, const std::string& source);

// Header constants, exposed for tests and tools that inspect shards.
inline constexpr char kTokenShardMagic[8] = {'O', 'P', 'D', 'L', 'M', 'T', 'O', 'K'};
inline constexpr uint32_t kTokenShardVersion = 1;
inline constexpr size_t kTokenShardHeaderBytes = 128;

}  // namespace opdlm::io
