// Token shard writer/reader (layout in docs/data_formats.md) and the keyed document shuffle.
#include "opdlm/io/token_shard.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opdlm/base/error.hpp"
#include "opdlm/base/rng.hpp"

namespace opdlm::io {

static_assert(std::endian::native == std::endian::little, "token shards are read by memcpy: little-endian hosts only");

namespace {

// Byte offsets of the header fields (docs/data_formats.md).
constexpr size_t kOffMagic = 0, kOffVersion = 8, kOffDtype = 12, kOffTokens = 16, kOffDocs = 24,
                 kOffVocab = 32, kOffPayloadCrc = 36, kOffTokSha = 40, kOffReserved = 72,
                 kOffHeaderCrc = 124;

template <class T>
void put(std::vector<uint8_t>& buf, size_t off, T v) {
  std::memcpy(buf.data() + off, &v, sizeof(T));
}
template <class T>
T get(const uint8_t* p, size_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof(T));
  return v;
}

void write_all(int fd, const void* data, size_t n, const std::string& tmp) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) OPDLM_FAIL_AT(tmp, "", "write failed: ", std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

TokenDType token_dtype_for_vocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDType::u16 : TokenDType::u32;
}

TokenShard::TokenShard(int64_t vocab_size, const Sha256Digest& tokenizer_sha256)
    : vocab_size_(vocab_size), tokenizer_sha256_(tokenizer_sha256) {
  OPDLM_CHECK(vocab_size > 0 && vocab_size <= TokenShardLimits::kMaxVocab, "vocab_size ", vocab_size,
              " outside [1, 2^31]");
}

void TokenShard::add_document(std::span<const int32_t> ids) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab_size_)
      OPDLM_FAIL("token id ", ids[i], " at position ", i, " of document ", num_documents(),
                 " is outside the vocabulary [0, ", vocab_size_, ")");
  OPDLM_CHECK(tokens_.size() + ids.size() <= TokenShardLimits::kMaxTokens, "shard token limit");
  OPDLM_CHECK(num_documents() < TokenShardLimits::kMaxDocuments, "shard document limit");
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());
  offsets_.push_back(tokens_.size());
}

std::span<const int32_t> TokenShard::document(uint64_t i) const {
  OPDLM_CHECK(i < num_documents(), "document ", i, " of ", num_documents());
  return {tokens_.data() + offsets_[i], tokens_.data() + offsets_[i + 1]};
}

void TokenShard::write(const std::string& path) const {
  const TokenDType dt = dtype();
  const size_t width = static_cast<size_t>(dt);
  std::vector<uint8_t> payload((offsets_.size()) * 8 + tokens_.size() * width);
  std::memcpy(payload.data(), offsets_.data(), offsets_.size() * 8);
  uint8_t* tok = payload.data() + offsets_.size() * 8;
  if (dt == TokenDType::u16) {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      const auto v = static_cast<uint16_t>(tokens_[i]);
      std::memcpy(tok + 2 * i, &v, 2);
    }
  } else {
    std::memcpy(tok, tokens_.data(), tokens_.size() * 4);
  }

  std::vector<uint8_t> header(kTokenShardHeaderBytes, 0);
  std::memcpy(header.data() + kOffMagic, kTokenShardMagic, 8);
  put<uint32_t>(header, kOffVersion, kTokenShardVersion);
  put<uint32_t>(header, kOffDtype, static_cast<uint32_t>(dt));
  put<uint64_t>(header, kOffTokens, tokens_.size());
  put<uint64_t>(header, kOffDocs, num_documents());
  put<uint32_t>(header, kOffVocab, static_cast<uint32_t>(vocab_size_));
  put<uint32_t>(header, kOffPayloadCrc, crc32c(payload.data(), payload.size()));
  std::memcpy(header.data() + kOffTokSha, tokenizer_sha256_.data(), 32);
  put<uint32_t>(header, kOffHeaderCrc, crc32c(header.data(), kOffHeaderCrc));

  // Temp file in the same folder (rename is atomic only within a file system), fsync, rename.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) OPDLM_FAIL_AT(path, "", "cannot create temporary file ", tmp, ": ", std::strerror(errno));
  try {
    write_all(fd, header.data(), header.size(), tmp);
    write_all(fd, payload.data(), payload.size(), tmp);
    if (::fsync(fd) != 0) OPDLM_FAIL_AT(tmp, "", "fsync failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    OPDLM_FAIL_AT(path, "", "cannot move temporary shard into place: ", std::strerror(e));
  }
}

TokenShard TokenShard::read(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) OPDLM_FAIL_AT(path, "", "cannot open token shard: ", std::strerror(errno));
  const auto file_size = static_cast<uint64_t>(st.st_size);
  std::ifstream in(path, std::ios::binary);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open token shard");

  if (file_size < kTokenShardHeaderBytes)
    OPDLM_FAIL_AT(path, "header", "truncated: file has ", file_size, " bytes, the header alone is ",
                  kTokenShardHeaderBytes);
  uint8_t h[kTokenShardHeaderBytes];
  in.read(reinterpret_cast<char*>(h), kTokenShardHeaderBytes);
  if (!in) OPDLM_FAIL_AT(path, "header", "read error");

  if (std::memcmp(h + kOffMagic, kTokenShardMagic, 8) != 0)
    OPDLM_FAIL_AT(path, "magic", "bad magic: not an opdlm token shard (expected \"OPDLMTOK\")");
  const auto version = get<uint32_t>(h, kOffVersion);
  if (version != kTokenShardVersion)
    OPDLM_FAIL_AT(path, "version", "unsupported version ", version, " (this build reads ", kTokenShardVersion, ")");
  const auto header_crc = get<uint32_t>(h, kOffHeaderCrc), header_crc_now = crc32c(h, kOffHeaderCrc);
  if (header_crc != header_crc_now)
    OPDLM_FAIL_AT(path, "header_crc32c", "header checksum mismatch: stored ", header_crc, ", computed ",
                  header_crc_now);
  for (size_t i = kOffReserved; i < kOffHeaderCrc; ++i)
    if (h[i] != 0) OPDLM_FAIL_AT(path, "reserved", "reserved header byte ", i, " is not zero");

  const auto dtype_raw = get<uint32_t>(h, kOffDtype);
  const auto n_tokens = get<uint64_t>(h, kOffTokens);
  const auto n_docs = get<uint64_t>(h, kOffDocs);
  const auto vocab = get<uint32_t>(h, kOffVocab);
  if (dtype_raw != 2 && dtype_raw != 4)
    OPDLM_FAIL_AT(path, "dtype", "token dtype ", dtype_raw, " is neither 2 (u16) nor 4 (u32)");
  if (vocab == 0 || vocab > TokenShardLimits::kMaxVocab)
    OPDLM_FAIL_AT(path, "vocab_size", "absurd vocab_size ", vocab, " (must be in [1, 2^31])");
  if (dtype_raw == 2 && vocab > 65536)
    OPDLM_FAIL_AT(path, "dtype", "u16 tokens cannot hold vocab_size ", vocab);
  if (n_tokens > TokenShardLimits::kMaxTokens)
    OPDLM_FAIL_AT(path, "n_tokens", "absurd token count ", n_tokens, " (limit ", TokenShardLimits::kMaxTokens, ")");
  if (n_docs > TokenShardLimits::kMaxDocuments)
    OPDLM_FAIL_AT(path, "n_docs", "absurd document count ", n_docs, " (limit ", TokenShardLimits::kMaxDocuments, ")");
  // Both counts are capped, so this cannot overflow; the file size then bounds every allocation.
  const uint64_t payload_bytes = (n_docs + 1) * 8 + n_tokens * dtype_raw;
  const uint64_t expected = kTokenShardHeaderBytes + payload_bytes;
  if (file_size < expected)
    OPDLM_FAIL_AT(path, "n_tokens", "truncated: file has ", file_size, " bytes, header declares ", expected,
                  " (", n_docs, " documents, ", n_tokens, " tokens)");
  if (file_size > expected)
    OPDLM_FAIL_AT(path, "n_tokens", "file has ", file_size - expected, " trailing bytes after the declared ",
                  expected);

  std::vector<uint8_t> payload(payload_bytes);
  in.read(reinterpret_cast<char*>(payload.data()), static_cast<std::streamsize>(payload_bytes));
  if (!in) OPDLM_FAIL_AT(path, "payload", "truncated: read error in the payload");
  const auto payload_crc = get<uint32_t>(h, kOffPayloadCrc), payload_crc_now = crc32c(payload.data(), payload.size());
  if (payload_crc != payload_crc_now)
    OPDLM_FAIL_AT(path, "payload_crc32c", "payload checksum mismatch: stored ", payload_crc, ", computed ",
                  payload_crc_now);

  Sha256Digest tok_sha{};
  std::memcpy(tok_sha.data(), h + kOffTokSha, 32);
  TokenShard s(vocab, tok_sha);
  s.offsets_.resize(n_docs + 1);
  std::memcpy(s.offsets_.data(), payload.data(), (n_docs + 1) * 8);
  if (s.offsets_.front() != 0) OPDLM_FAIL_AT(path, "offsets", "offsets[0] is ", s.offsets_.front(), ", expected 0");
  for (uint64_t i = 0; i < n_docs; ++i)
    if (s.offsets_[i + 1] < s.offsets_[i])
      OPDLM_FAIL_AT(path, "offsets", "offsets decrease at document ", i, ": ", s.offsets_[i], " then ",
                    s.offsets_[i + 1]);
  if (s.offsets_.back() != n_tokens)
    OPDLM_FAIL_AT(path, "offsets", "last offset is ", s.offsets_.back(), ", expected n_tokens = ", n_tokens);

  s.tokens_.resize(n_tokens);
  const uint8_t* tok = payload.data() + (n_docs + 1) * 8;
  if (dtype_raw == 2) {
    for (uint64_t i = 0; i < n_tokens; ++i) s.tokens_[i] = get<uint16_t>(tok, 2 * i);
  } else {
    std::memcpy(s.tokens_.data(), tok, n_tokens * 4);
  }
  for (uint64_t i = 0; i < n_tokens; ++i)
    if (s.tokens_[i] < 0 || static_cast<uint32_t>(s.tokens_[i]) >= vocab)
      OPDLM_FAIL_AT(path, "tokens", "token ", i, " has id ", static_cast<uint32_t>(s.tokens_[i]),
                    ", outside vocab_size ", vocab);
  return s;
}

TokenShard TokenShard::shuffled(uint32_t seed, uint32_t epoch) const {
  TokenShard out(vocab_size_, tokenizer_sha256_);
  out.tokens_.reserve(tokens_.size());
  out.offsets_.reserve(offsets_.size());
  for (uint64_t d : shuffle_permutation(num_documents(), seed, epoch)) out.add_document(document(d));
  return out;
}

std::vector<uint64_t> shuffle_permutation(uint64_t n, uint32_t seed, uint32_t epoch) {
  OPDLM_CHECK(n < (uint64_t{1} << 32), "cannot shuffle ", n, " items (limit 2^32 - 1)");
  std::vector<uint64_t> perm(n);
  for (uint64_t i = 0; i < n; ++i) perm[i] = i;
  const CounterRng rng(RngKey{seed, RngPurpose::data_shuffle, epoch, 0, 0});
  CounterRng::Cursor cur(rng);
  // Fisher-Yates, from the back: slot i takes a uniform pick among the first i + 1.
  for (uint64_t i = n; i > 1; --i) std::swap(perm[i - 1], perm[cur.below(static_cast<uint32_t>(i))]);
  return perm;
}

DocFormat parse_doc_format(std::string_view name) {
  if (name == "lines") return DocFormat::lines;
  if (name == "paragraphs") return DocFormat::paragraphs;
  if (name == "text") return DocFormat::text;
  if (name == "jsonl") return DocFormat::jsonl;
  OPDLM_FAIL_AT("--format", "format", "unknown document format '", name, "' (lines, paragraphs, text, jsonl)");
}

std::vector<std::string> split_documents(std::string_view content, DocFormat format, const std::string& jsonl_field,
                                         bool keep_newlines, const std::string& source) {
  std::vector<std::string> docs;
  if (format == DocFormat::text) {
    if (!content.empty()) docs.emplace_back(content);
    return docs;
  }
  std::string para;
  auto flush_para = [&] {
    if (para.empty()) return;
    if (!keep_newlines) para.pop_back();
    docs.push_back(std::move(para));
    para.clear();
  };
  size_t pos = 0;
  for (int64_t lineno = 1; pos < content.size(); ++lineno) {
    size_t nl = content.find('\n', pos);
    if (nl == std::string_view::npos) nl = content.size();
    std::string_view line = content.substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const bool blank = line.find_first_not_of(" \t") == std::string_view::npos;
    switch (format) {
      case DocFormat::lines:
        if (!blank) docs.push_back(std::string(line) + (keep_newlines ? "\n" : ""));
        break;
      case DocFormat::paragraphs:
        if (blank)
          flush_para();
        else
          (para += line) += '\n';
        break;
      case DocFormat::jsonl: {
        if (blank) break;
        const std::string where = source + ":" + std::to_string(lineno);
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {  // number overflows too, not only parse errors
          OPDLM_FAIL_AT(where, "", "invalid JSON: ", e.what());
        }
        if (j.is_object() && j.contains("_header")) break;
        auto it = j.is_object() ? j.find(jsonl_field) : j.end();
        if (!j.is_object() || it == j.end() || !it->is_string())
          OPDLM_FAIL_AT(where, jsonl_field, "expected an object with a string field '", jsonl_field, "'");
        docs.push_back(it->get<std::string>());
        break;
      }
      case DocFormat::text:
        break;
    }
  }
  flush_para();
  return docs;
}

}  // namespace opdlm::io
