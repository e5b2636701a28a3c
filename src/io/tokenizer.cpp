// Byte-level BPE tokenizer compatible with Hugging Face tokenizers (Rust) for tokenizer.json files of
// the GPT-2 / Qwen2 / Qwen3 kind. Each stage mirrors the HF code it copies (named in the comments),
// because "exactly the same ids" depends on details: where added tokens are cut, what is normalised,
// how the regex sees \s, the order equal-rank merges apply, and how broken UTF-8 decodes.
#include "opdlm/io/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "opdlm/base/error.hpp"

namespace opdlm::io {
namespace {

using json = nlohmann::json;

// The ids (exclusive bound) a tokenizer.json with `entries` tokens may use: a dense vocabulary with
// room for reserved ranges, never beyond 2^24 (Qwen3Config's vocabulary limit). Id-indexed tables
// are sized by the largest id, so this bounds what a hostile file can make opdlm allocate.
int64_t max_token_id_limit(int64_t entries) { return std::min<int64_t>(int64_t{1} << 24, 2 * entries + 65536); }

// ---- UTF-8 ----------------------------------------------------------------------------------------

// Offset of the first byte that does not start a valid UTF-8 sequence (strict: no overlongs,
// surrogates or code points above U+10FFFF, the same rules as Rust's str and PCRE2), or npos.
size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // ASCII runs dominate real text: test 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
    else if (c == 0xED) len = 3, hi = 0x9F;  // no surrogates
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else return i;
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string_view::npos;
}

void check_utf8(std::string_view s, const char* what) {
  const size_t bad = find_invalid_utf8(s);
  if (bad != std::string_view::npos) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned char>(s[bad]));
    OPDLM_FAIL(what, ": invalid UTF-8 at byte offset ", bad, " (byte ", hex, ")");
  }
}

inline size_t utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

// Decodes the code point at s[i] (valid UTF-8 assumed).
uint32_t decode_cp(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  switch (utf8_len(p[0])) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3: return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default: return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
  }
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD (what HF's
// ByteLevel decoder returns for ids that split a character).
std::string utf8_lossy(std::string_view s) {
  if (find_invalid_utf8(s) == std::string_view::npos) return std::string(s);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  std::string out;
  out.reserve(n + 16);
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    size_t k = 1;  // bytes of the (possibly partial) sequence that are valid so far
    if (len) {
      for (; k < len && i + k < n; ++k) {
        const unsigned char b = p[i + k];
        const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (b < l || b > h) break;
      }
    }
    if (len && k == len) {
      out.append(s.substr(i, len));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += k;
  }
  return out;
}

// Rust char::is_whitespace (Unicode White_Space), used by added-token lstrip/rstrip.
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Approximates Rust char::is_alphanumeric (Alphabetic || Numeric) by general category L* / N*;
// only the rarely used single_word added-token flag depends on it.
bool is_alnum(uint32_t c) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

size_t prev_char_start(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// ---- byte-level alphabet (GPT-2 bytes_to_unicode) ------------------------------------------------

struct ByteAlphabet {
  std::array<std::string, 256> utf8;  // byte -> UTF-8 of its printable char
  std::array<int16_t, 324> byte_of;   // char code point (< 324) -> byte, -1 if not in the alphabet
  ByteAlphabet() {
    byte_of.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : 256u + static_cast<uint32_t>(extra++);
      append_utf8(utf8[b], cp);
      byte_of[cp] = static_cast<int16_t>(b);
    }
  }
  // Maps a token string back to bytes; false when some char is outside the alphabet (then HF's
  // decoder keeps the token's own UTF-8 bytes).
  bool to_bytes(std::string_view tok, std::string& out) const {
    std::string r;
    for (size_t i = 0; i < tok.size(); i += utf8_len(static_cast<unsigned char>(tok[i]))) {
      const uint32_t cp = decode_cp(tok, i);
      if (cp >= byte_of.size() || byte_of[cp] < 0) return false;
      r += static_cast<char>(byte_of[cp]);
    }
    out = std::move(r);
    return true;
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// ---- regex (PCRE2, UTF + UCP, JIT) -----------------------------------------------------------------

// HF tokenizers runs these patterns with Oniguruma, whose Unicode \s is [\t\n\v\f\r\x85] plus
// Z categories; PCRE2's UCP \s also takes U+180E. Spelling \s out keeps the two identical.
std::string onig_compatible(const std::string& pat) {
  static const std::string kSpace = "\\t\\n\\x{0B}\\f\\r\\x{85}\\p{Z}";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pat.size(); ++i) {
    const char c = pat[i];
    if (c == '\\' && i + 1 < pat.size()) {
      const char d = pat[i + 1];
      if (d == 's') out += in_class ? kSpace : "[" + kSpace + "]";
      else if (d == 'S' && !in_class) out += "[^" + kSpace + "]";
      else out += pat.substr(i, 2);
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pat.size() && pat[i + 1] == '^') out += pat[++i];
      if (i + 1 < pat.size() && pat[i + 1] == ']') out += pat[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < pat.size() && pat[i + 1] == ':') {  // POSIX [:alpha:]
      const size_t end = pat.find(":]", i + 2);
      if (end != std::string::npos) {
        out += pat.substr(i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

// Per-thread match state: match data and a JIT stack larger than the 32 KiB default.
struct MatchScratch {
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* mc = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(mc, nullptr, js); }
  ~MatchScratch() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    pcre2_jit_stack_free(js);
  }
};

// One per thread, shared by every pattern (a function-local thread_local inside the find_all
// template would make one per instantiation).
MatchScratch& match_scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& file, const std::string& field) {
    const std::string pat = literal ? pattern : onig_compatible(pattern);
    int err = 0;
    PCRE2_SIZE off = 0;
    const uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);  // LITERAL rejects UCP
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), opts, &err, &off, nullptr);
    if (!code_)
      OPDLM_FAIL_AT(file, field, "regex does not compile with PCRE2 at offset ", off, ": ",
                    pcre2_message(err), " (pattern: ", pattern, ")");
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is absent
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // f(begin, end) for each non-overlapping match, left to right (Onig find_iter semantics: after
  // an empty match the search moves on by one character). `s` must be valid UTF-8.
  template <class F>
  void find_all(std::string_view s, F&& f) const {
    MatchScratch& scratch = match_scratch();
    size_t start = 0;
    while (start <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start,
                                 PCRE2_NO_UTF_CHECK, scratch.md, scratch.mc);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) OPDLM_FAIL("tokenizer regex match failed: ", pcre2_message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.md);
      const size_t b = ov[0], e = ov[1];  // copied before f, which may match again (nested steps)
      f(b, e);
      if (e > b) start = e;
      else if (e >= s.size()) break;
      else start = e + utf8_len(static_cast<unsigned char>(s[e]));
    }
  }

  // HF NormalizedString::split with a pattern: pieces by behaviour, empty pieces dropped.
  template <class F>
  void split(std::string_view s, Behavior behavior, bool invert, F&& f) const {
    if (behavior == Behavior::Isolated) {  // the common case, streamed
      size_t prev = 0;
      find_all(s, [&](size_t b, size_t e) {
        if (prev < b) f(s.substr(prev, b - prev));
        if (b < e) f(s.substr(b, e - b));
        prev = e;
      });
      if (prev < s.size()) f(s.substr(prev));
      return;
    }
    struct Part { size_t b, e; bool match; };
    std::vector<Part> parts;
    size_t prev = 0;
    find_all(s, [&](size_t b, size_t e) {
      if (prev != b) parts.push_back({prev, b, false});
      parts.push_back({b, e, true});
      prev = e;
    });
    if (prev != s.size()) parts.push_back({prev, s.size(), false});
    if (invert)
      for (auto& p : parts) p.match = !p.match;
    std::vector<Part> out;  // match == "remove" below
    bool prev_match = false;
    switch (behavior) {
      case Behavior::Removed:
        out = parts;
        break;
      case Behavior::Contiguous:
        for (const auto& p : parts) {
          if (p.match == prev_match && !out.empty()) out.back().e = p.e;
          else out.push_back({p.b, p.e, false});
          prev_match = p.match;
        }
        break;
      case Behavior::MergedWithPrevious:
        for (const auto& p : parts) {
          if (p.match && !prev_match && !out.empty()) out.back().e = p.e;
          else out.push_back({p.b, p.e, false});
          prev_match = p.match;
        }
        break;
      case Behavior::MergedWithNext:
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
          if (it->match && !prev_match && !out.empty()) out.back().b = it->b;
          else out.push_back({it->b, it->e, false});
          prev_match = it->match;
        }
        std::reverse(out.begin(), out.end());
        break;
      case Behavior::Isolated:
        break;
    }
    for (const auto& p : out)
      if (!p.match && p.e > p.b) f(s.substr(p.b, p.e - p.b));
  }

 private:
  pcre2_code* code_ = nullptr;
};

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- added tokens -----------------------------------------------------------------------------------

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false, normalized = false, lstrip = false, rstrip = false, single_word = false;
};

// Byte trie over added-token contents, matched leftmost-longest like HF's Aho-Corasick
// (MatchKind::LeftmostLongest): at the leftmost position where any token starts, the longest wins.
class AddedMatcher {
 public:
  void add(std::string_view s, int32_t index) {
    if (s.empty()) return;
    if (nodes_.empty()) nodes_.emplace_back();
    first_[static_cast<unsigned char>(s[0])] = true;
    int32_t n = 0;
    for (char ch : s) {
      const auto c = static_cast<unsigned char>(ch);
      int32_t next = child(n, c);
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_[n].next.emplace_back(c, next);
        nodes_.emplace_back();
      }
      n = next;
    }
    nodes_[n].token = index;
  }
  bool empty() const { return nodes_.empty(); }
  struct Match { size_t b, e; int32_t index; };
  bool find(std::string_view s, size_t from, Match& m) const {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    for (size_t i = from; i < s.size(); ++i) {
      if (!first_[p[i]]) continue;
      int32_t n = 0, best = -1;
      size_t best_end = 0;
      for (size_t j = i; j < s.size(); ++j) {
        n = child(n, p[j]);
        if (n < 0) break;
        if (nodes_[n].token >= 0) best = nodes_[n].token, best_end = j + 1;
      }
      if (best >= 0) {
        m = {i, best_end, best};
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;
    int32_t token = -1;
  };
  int32_t child(int32_t n, unsigned char c) const {
    for (const auto& [k, v] : nodes_[n].next)
      if (k == c) return v;
    return -1;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
};

// ---- pre-token cache --------------------------------------------------------------------------------

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
struct SvEq {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const { return a == b; }
};

// Sharded so that data-loader threads rarely wait on each other.
struct CacheShard {
  std::mutex mu;
  std::unordered_map<std::string, std::vector<int32_t>, SvHash, SvEq> map;
};
constexpr size_t kCacheShards = 32;
constexpr size_t kCacheMaxKeyBytes = 256;     // longer pre-tokens are rare and cheap to redo
constexpr size_t kCacheMaxPerShard = 1 << 14;  // 512k entries in all (tens of MB), then a shard starts over

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) OPDLM_FAIL_AT(path, "", "cannot open ", what);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The JSON value as a dump with every line after the first indented by `pad` (for save()).
template <class Json>
std::string dump_at(const Json& j, int pad) {
  const std::string d = j.dump(2);
  std::string out;
  for (char c : d) {
    out += c;
    if (c == '\n') out.append(pad, ' ');
  }
  return out;
}

}  // namespace

// ---- the tokenizer's state --------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string source;  // file name for errors

  // model (BPE)
  std::unordered_map<std::string, int32_t, SvHash, SvEq> vocab;
  std::vector<std::string> model_tokens;  // id -> token; holes are empty with has_model[id] == 0
  std::vector<uint8_t> has_model;
  std::vector<std::pair<int32_t, int32_t>> merges_list;  // in file order (rank = index)
  bool merges_as_strings = false;                        // "a b" (legacy) instead of [a, b]
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a,b) -> (rank, new id)
  std::array<int32_t, 256> byte_id{};  // id of each byte's alphabet char, -1 when absent
  bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
  int32_t unk_id = -1;
  json model_extra;  // the model object without vocab and merges (kept for save)

  // added tokens
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t, SvHash, SvEq> added_by_content;  // -> index in `added`
  std::unordered_map<int32_t, int32_t> added_by_id;                         // id -> index
  AddedMatcher raw_matcher, norm_matcher;

  // pipeline
  std::vector<utf8proc_option_t> normalizers;
  struct Step {
    bool byte_level = false;
    std::shared_ptr<Regex> re;  // Split
    Behavior behavior = Behavior::Isolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel
    std::shared_ptr<Regex> gpt2;    // ByteLevel with use_regex
  };
  std::vector<Step> steps;

  // sections written back by save()
  json version = "1.0", truncation, padding, normalizer_j, pre_tokenizer_j, post_processor_j, decoder_j;

  std::vector<std::string> decoded;  // id -> bytes from the byte-level decoder
  std::vector<uint8_t> has_decoded;
  int32_t vocab_size = 0;

  mutable std::array<CacheShard, kCacheShards> cache;

  // -- normalisation --
  std::string_view normalize(std::string_view s, std::string& buf) const {
    if (normalizers.empty() || is_ascii(s)) return s;  // ASCII is invariant under NF(K)C/D
    buf.assign(s);
    for (auto opts : normalizers) {
      utf8proc_uint8_t* out = nullptr;
      const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(buf.data()),
                                  static_cast<utf8proc_ssize_t>(buf.size()), &out, opts);
      if (n < 0) OPDLM_FAIL("tokenizer normalizer (utf8proc): ", utf8proc_errmsg(n));
      buf.assign(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
      std::free(out);
    }
    return buf;
  }

  // -- added tokens: HF AddedVocabulary::split_with_indices --
  template <class Text, class Tok>
  void split_added(std::string_view s, const AddedMatcher& m, Text&& on_text, Tok&& on_token) const {
    if (m.empty()) {
      if (!s.empty()) on_text(s);
      return;
    }
    size_t start_offset = 0, from = 0;
    AddedMatcher::Match mt;
    while (from < s.size() && m.find(s, from, mt)) {
      from = mt.e;
      const AddedToken& t = added[mt.index];
      size_t start = mt.b, stop = mt.e;
      if (t.single_word) {
        const bool start_space = start == 0 || !is_alnum(decode_cp(s, prev_char_start(s, start)));
        const bool stop_space = stop == s.size() || !is_alnum(decode_cp(s, stop));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        size_t ns = start;
        while (ns > 0) {
          const size_t p = prev_char_start(s, ns);
          if (!is_white_space(decode_cp(s, p))) break;
          ns = p;
        }
        start = std::max(ns, start_offset);
      }
      if (t.rstrip) {
        while (stop < s.size() && is_white_space(decode_cp(s, stop)))
          stop += utf8_len(static_cast<unsigned char>(s[stop]));
        from = std::max(from, stop);
      }
      start = std::max(start, start_offset);
      if (start_offset < start) on_text(s.substr(start_offset, start - start_offset));
      on_token(t.id);
      start_offset = stop;
    }
    if (start_offset < s.size()) on_text(s.substr(start_offset));
  }

  // Raw split, normalise each remaining piece, then the split on normalized added tokens
  // (HF AddedVocabulary::extract_and_normalize).
  template <class Seg, class Tok>
  void for_each_segment(std::string_view text, Seg&& on_segment, Tok&& on_token) const {
    split_added(
        text, raw_matcher,
        [&](std::string_view piece) {
          std::string buf;
          const std::string_view n = normalize(piece, buf);
          split_added(n, norm_matcher, on_segment, on_token);
        },
        on_token);
  }

  // -- pre-tokenizer steps; the ByteLevel step is last --
  template <class F>
  void pre_split(std::string_view s, size_t k, F& f) const {
    if (s.empty()) return;
    const Step& st = steps[k];
    if (!st.byte_level) {
      st.re->split(s, st.behavior, st.invert, [&](std::string_view p) { pre_split(p, k + 1, f); });
      return;
    }
    std::string tmp;
    if (st.add_prefix_space && s[0] != ' ') {
      tmp.reserve(s.size() + 1);
      tmp += ' ';
      tmp += s;
      s = tmp;
    }
    if (st.gpt2) st.gpt2->split(s, Behavior::Isolated, false, f);
    else f(s);
  }

  // -- BPE on one pre-token (HF models/bpe: merge_word + Word::merge_all) --
  void bpe(std::string_view word, std::vector<int32_t>& out) const {
    struct Sym { int32_t c, prev, next, len; };
    std::vector<Sym> syms;
    syms.reserve(word.size());
    auto push = [&](int32_t id, int32_t len) {
      const auto i = static_cast<int32_t>(syms.size());
      syms.push_back({id, i - 1, i + 1, len});
    };
    bool last_unk = false;
    for (size_t i = 0; i < word.size(); ++i) {
      const auto b = static_cast<unsigned char>(word[i]);
      if (byte_id[b] >= 0) {
        push(byte_id[b], 1);
        last_unk = false;
        continue;
      }
      // The byte's alphabet char is not in the vocabulary: byte fallback, unk, or dropped.
      if (byte_fallback) {
        const std::string& ch = alphabet().utf8[b];
        std::vector<int32_t> ids;
        for (char x : ch) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned char>(x));
          auto it = vocab.find(std::string_view(name));
          if (it == vocab.end()) break;
          ids.push_back(it->second);
        }
        if (ids.size() == ch.size()) {
          for (int32_t id : ids) push(id, 1);
          last_unk = false;
          continue;
        }
      }
      if (unk_id >= 0) {
        if (fuse_unk && last_unk) syms.back().len += 1;
        else push(unk_id, 1);
        last_unk = true;
      }
    }
    if (syms.empty()) return;
    syms.back().next = -1;
    if (ignore_merges) {
      std::string whole;
      for (unsigned char b : word) whole += alphabet().utf8[b];
      auto it = vocab.find(std::string_view(whole));
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    if (syms.size() > 1 && !merges.empty()) {
      struct M { int32_t rank, pos, id; };
      auto worse = [](const M& a, const M& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
      std::priority_queue<M, std::vector<M>, decltype(worse)> q(worse);
      auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
        auto it = merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
        return it == merges.end() ? nullptr : &it->second;
      };
      for (size_t i = 0; i + 1 < syms.size(); ++i)
        if (auto m = lookup(syms[i].c, syms[i + 1].c)) q.push({m->first, static_cast<int32_t>(i), m->second});
      while (!q.empty()) {
        const M top = q.top();
        q.pop();
        Sym& cur = syms[top.pos];
        if (cur.len == 0 || cur.next < 0) continue;
        const int32_t nx = cur.next;
        // Stale entries are detected by the new id only, exactly as HF does.
        auto m = lookup(cur.c, syms[nx].c);
        if (!m || m->second != top.id) continue;
        cur.c = top.id;
        cur.len += syms[nx].len;
        cur.next = syms[nx].next;
        syms[nx].len = 0;
        if (cur.next >= 0) syms[cur.next].prev = top.pos;
        if (cur.prev >= 0)
          if (auto pm = lookup(syms[cur.prev].c, cur.c)) q.push({pm->first, cur.prev, pm->second});
        if (cur.next >= 0)
          if (auto nm = lookup(cur.c, syms[cur.next].c)) q.push({nm->first, top.pos, nm->second});
      }
    }
    for (const Sym& s : syms)
      if (s.len > 0) out.push_back(s.c);
  }

  void bpe_cached(std::string_view word, std::vector<int32_t>& out) const {
    if (word.size() > kCacheMaxKeyBytes) {
      bpe(word, out);
      return;
    }
    CacheShard& sh = cache[SvHash{}(word) % kCacheShards];
    {
      std::lock_guard<std::mutex> lk(sh.mu);
      auto it = sh.map.find(word);
      if (it != sh.map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t before = out.size();
    bpe(word, out);
    std::vector<int32_t> ids(out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
    std::lock_guard<std::mutex> lk(sh.mu);
    if (sh.map.size() >= kCacheMaxPerShard) sh.map.clear();
    sh.map.emplace(std::string(word), std::move(ids));
  }

  // -- loading --
  void load(const json& j);
  void parse_model(const json& m);
  void parse_added(const json& a);
  void parse_normalizer(const json& n, const std::string& field);
  void parse_pre_tokenizer(const json& p, const std::string& field);
  void parse_decoder(const json& d, const std::string& field);
  void finish();

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    OPDLM_FAIL_AT(source, field, "tokenizer.json: ", msg);
  }
  const json& need(const json& obj, const char* key, const std::string& field) const {
    if (!obj.is_object()) fail(field, "expected an object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(field.empty() ? key : field + "." + key, "missing");
    return *it;
  }
  bool flag(const json& obj, const char* key, bool dflt, const std::string& field) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) fail(field + "." + key, "expected true or false");
    return it->get<bool>();
  }
};

namespace {
std::string type_of(const json& j) {
  auto it = j.find("type");
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
}
}  // namespace

void Tokenizer::Impl::load(const json& j) {
  if (!j.is_object()) fail("", "the top level is not a JSON object");
  if (j.contains("version")) version = j["version"];
  truncation = j.value("truncation", json());
  padding = j.value("padding", json());
  auto mi = j.find("model");
  if (mi == j.end() || mi->is_null()) fail("model", "missing (a BPE model is required)");
  parse_model(*mi);
  if (auto a = j.find("added_tokens"); a != j.end() && !a->is_null()) parse_added(*a);
  normalizer_j = j.value("normalizer", json());
  parse_normalizer(normalizer_j, "normalizer");
  pre_tokenizer_j = j.value("pre_tokenizer", json());
  parse_pre_tokenizer(pre_tokenizer_j, "pre_tokenizer");
  if (steps.empty() || !steps.back().byte_level)
    fail("pre_tokenizer", "a ByteLevel pre-tokenizer must be the last step (only byte-level BPE is supported)");
  for (size_t i = 0; i + 1 < steps.size(); ++i)
    if (steps[i].byte_level) fail("pre_tokenizer", "ByteLevel must be the last pre-tokenizer step");
  post_processor_j = j.value("post_processor", json());
  decoder_j = j.value("decoder", json());
  parse_decoder(decoder_j, "decoder");
  finish();
}

void Tokenizer::Impl::parse_model(const json& m) {
  if (!m.is_object()) fail("model", "expected an object");
  const std::string type = type_of(m);
  if (type.empty()) fail("model.type", "missing");
  if (type != "BPE") fail("model.type", "unsupported model type '" + type + "' (only BPE)");
  const json& v = need(m, "vocab", "model");
  if (!v.is_object()) fail("model.vocab", "expected an object {token: id}");
  vocab.reserve(v.size());
  // Tables are indexed by id: ids far beyond the number of entries (a sparse or hostile vocabulary)
  // would make them huge, so they are refused before anything is sized by them.
  const int64_t id_limit = max_token_id_limit(static_cast<int64_t>(v.size()));
  for (auto it = v.begin(); it != v.end(); ++it) {
    const std::string field = "model.vocab[" + json(it.key()).dump() + "]";
    if (!it->is_number_integer()) fail(field, "id is not an integer");
    const int64_t id = it->get<int64_t>();
    if (id < 0 || id >= id_limit)
      fail(field, "id " + std::to_string(id) + " out of range [0, " + std::to_string(id_limit) + ")");
    if (static_cast<size_t>(id) >= model_tokens.size()) {
      model_tokens.resize(static_cast<size_t>(id) + 1);
      has_model.resize(static_cast<size_t>(id) + 1, 0);
    }
    if (has_model[id])
      fail(field, "id collision: id " + std::to_string(id) + " is also token " + json(model_tokens[id]).dump());
    has_model[id] = 1;
    model_tokens[id] = it.key();
    vocab.emplace(it.key(), static_cast<int32_t>(id));
  }
  const json& mg = need(m, "merges", "model");
  if (!mg.is_array()) fail("model.merges", "expected an array");
  merges_list.reserve(mg.size());
  merges.reserve(mg.size());
  for (size_t r = 0; r < mg.size(); ++r) {
    const std::string field = "model.merges[" + std::to_string(r) + "]";
    const json& e = mg[r];
    std::string a, b;
    if (e.is_string()) {
      // Legacy "a b": exactly one space (HF splits on ' ' and wants two parts).
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail(field, "merge " + e.dump() + " is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
      if (r == 0) merges_as_strings = true;
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      fail(field, "merge " + e.dump() + " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    auto ia = vocab.find(std::string_view(a)), ib = vocab.find(std::string_view(b));
    if (ia == vocab.end()) fail(field, "token " + json(a).dump() + " is not in model.vocab");
    if (ib == vocab.end()) fail(field, "token " + json(b).dump() + " is not in model.vocab");
    auto in = vocab.find(std::string_view(a + b));
    if (in == vocab.end()) fail(field, "merged token " + json(a + b).dump() + " is not in model.vocab");
    merges_list.emplace_back(ia->second, ib->second);
    // A repeated pair keeps the later rank (HF collects the list into a HashMap).
    merges.insert_or_assign((static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                                static_cast<uint32_t>(ib->second),
                            std::make_pair(static_cast<int32_t>(r), in->second));
  }
  if (auto d = m.find("dropout"); d != m.end() && !d->is_null() && d->get<double>() != 0.0)
    fail("model.dropout", "BPE dropout is not supported (encoding must be deterministic)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = m.find(k);
    if (it != m.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty()))
      fail(std::string("model.") + k, "must be empty or null (byte-level BPE)");
  }
  ignore_merges = flag(m, "ignore_merges", false, "model");
  byte_fallback = flag(m, "byte_fallback", false, "model");
  fuse_unk = flag(m, "fuse_unk", false, "model");
  if (auto u = m.find("unk_token"); u != m.end() && !u->is_null()) {
    if (!u->is_string()) fail("model.unk_token", "expected a string or null");
    auto it = vocab.find(u->get<std::string>());
    if (it == vocab.end()) fail("model.unk_token", "token " + u->dump() + " is not in model.vocab");
    unk_id = it->second;
  }
  model_extra = m;
  model_extra.erase("vocab");
  model_extra.erase("merges");
}

void Tokenizer::Impl::parse_added(const json& a) {
  if (!a.is_array()) fail("added_tokens", "expected an array");
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string field = "added_tokens[" + std::to_string(i) + "]";
    const json& e = a[i];
    AddedToken t;
    const json& id = need(e, "id", field);
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= max_token_id_limit(static_cast<int64_t>(model_tokens.size()) + static_cast<int64_t>(a.size())))
      fail(field + ".id", "not a valid id (negative, or far beyond the vocabulary's size): " + id.dump());
    t.id = id.get<int32_t>();
    const json& c = need(e, "content", field);
    if (!c.is_string() || c.get<std::string>().empty()) fail(field + ".content", "expected a non-empty string");
    t.content = c.get<std::string>();
    t.special = flag(e, "special", false, field);
    t.normalized = flag(e, "normalized", !t.special, field);
    t.lstrip = flag(e, "lstrip", false, field);
    t.rstrip = flag(e, "rstrip", false, field);
    t.single_word = flag(e, "single_word", false, field);
    if (added_by_id.count(t.id))
      fail(field + ".id", "id collision: id " + std::to_string(t.id) + " is also added token " +
                              json(added[added_by_id[t.id]].content).dump());
    if (added_by_content.count(t.content)) fail(field + ".content", "duplicate added token " + c.dump());
    if (static_cast<size_t>(t.id) < has_model.size() && has_model[t.id] && model_tokens[t.id] != t.content)
      fail(field + ".id", "id collision: id " + std::to_string(t.id) + " is model token " +
                              json(model_tokens[t.id]).dump() + ", not " + c.dump());
    if (auto it = vocab.find(std::string_view(t.content)); it != vocab.end() && it->second != t.id)
      fail(field + ".id", "content " + c.dump() + " is model token " + std::to_string(it->second) +
                              " but the added token says id " + std::to_string(t.id));
    added_by_id[t.id] = static_cast<int32_t>(added.size());
    added_by_content[t.content] = static_cast<int32_t>(added.size());
    added.push_back(std::move(t));
  }
}

void Tokenizer::Impl::parse_normalizer(const json& n, const std::string& field) {
  if (n.is_null()) return;
  const std::string type = type_of(n);
  if (type == "NFC") normalizers.push_back(static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  else if (type == "NFD") normalizers.push_back(static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE));
  else if (type == "NFKC")
    normalizers.push_back(static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
  else if (type == "NFKD")
    normalizers.push_back(static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  else if (type == "Sequence") {
    const json& list = need(n, "normalizers", field);
    if (!list.is_array()) fail(field + ".normalizers", "expected an array");
    for (size_t i = 0; i < list.size(); ++i)
      parse_normalizer(list[i], field + ".normalizers[" + std::to_string(i) + "]");
  } else {
    fail(field + ".type", "unsupported normalizer '" + type + "' (NFC, NFD, NFKC, NFKD, Sequence)");
  }
}

void Tokenizer::Impl::parse_pre_tokenizer(const json& p, const std::string& field) {
  if (p.is_null()) fail(field, "missing (byte-level BPE needs a ByteLevel pre-tokenizer)");
  const std::string type = type_of(p);
  if (type == "Sequence") {
    const json& list = need(p, "pretokenizers", field);
    if (!list.is_array()) fail(field + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < list.size(); ++i)
      parse_pre_tokenizer(list[i], field + ".pretokenizers[" + std::to_string(i) + "]");
  } else if (type == "Split") {
    Step s;
    const json& pat = need(p, "pattern", field);
    if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string())
      s.re = std::make_shared<Regex>(pat["Regex"].get<std::string>(), false, source, field + ".pattern.Regex");
    else if (pat.is_object() && pat.contains("String") && pat["String"].is_string())
      s.re = std::make_shared<Regex>(pat["String"].get<std::string>(), true, source, field + ".pattern.String");
    else
      fail(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    const json& beh = need(p, "behavior", field);
    const std::string b = beh.is_string() ? beh.get<std::string>() : std::string();
    if (b == "Removed") s.behavior = Behavior::Removed;
    else if (b == "Isolated") s.behavior = Behavior::Isolated;
    else if (b == "MergedWithPrevious") s.behavior = Behavior::MergedWithPrevious;
    else if (b == "MergedWithNext") s.behavior = Behavior::MergedWithNext;
    else if (b == "Contiguous") s.behavior = Behavior::Contiguous;
    else fail(field + ".behavior", "unknown split behavior " + beh.dump());
    s.invert = flag(p, "invert", false, field);
    steps.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    Step s;
    s.byte_level = true;
    s.add_prefix_space = flag(p, "add_prefix_space", true, field);  // HF defaults
    if (flag(p, "use_regex", true, field)) s.gpt2 = std::make_shared<Regex>(kGpt2Pattern, false, source, field);
    steps.push_back(std::move(s));
  } else {
    fail(field + ".type", "unsupported pre_tokenizer '" + type + "' (Sequence, Split, ByteLevel)");
  }
}

void Tokenizer::Impl::parse_decoder(const json& d, const std::string& field) {
  const std::string type = d.is_null() ? std::string("null") : type_of(d);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const json& list = need(d, "decoders", field);
    if (!list.is_array() || list.empty()) fail(field + ".decoders", "expected a non-empty array");
    for (size_t i = 0; i < list.size(); ++i) parse_decoder(list[i], field + ".decoders[" + std::to_string(i) + "]");
    return;
  }
  fail(field + (d.is_null() ? "" : ".type"), "unsupported decoder '" + type + "' (only ByteLevel)");
}

void Tokenizer::Impl::finish() {
  const ByteAlphabet& ab = alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab.find(std::string_view(ab.utf8[b]));
    byte_id[b] = it == vocab.end() ? -1 : it->second;
  }
  int64_t top = static_cast<int64_t>(model_tokens.size()) - 1;
  for (const auto& t : added) top = std::max<int64_t>(top, t.id);
  vocab_size = static_cast<int32_t>(top + 1);
  // Added tokens are matched by content; normalized ones after normalisation of their content.
  for (size_t i = 0; i < added.size(); ++i) {
    if (added[i].normalized) {
      std::string buf;
      norm_matcher.add(normalize(added[i].content, buf), static_cast<int32_t>(i));
    } else {
      raw_matcher.add(added[i].content, static_cast<int32_t>(i));
    }
  }
  // HF decode: added token content first, else the model token; each through the ByteLevel
  // decoder (a token with chars outside the alphabet keeps its own bytes).
  decoded.assign(static_cast<size_t>(vocab_size), std::string());
  has_decoded.assign(static_cast<size_t>(vocab_size), 0);
  auto set = [&](int32_t id, const std::string& tok) {
    if (!ab.to_bytes(tok, decoded[id])) decoded[id] = tok;
    has_decoded[id] = 1;
  };
  for (size_t id = 0; id < model_tokens.size(); ++id)
    if (has_model[id]) set(static_cast<int32_t>(id), model_tokens[id]);
  for (const auto& t : added) set(t.id, t.content);
}

// ---- public API ---------------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_json_string(std::string_view json_text, const std::string& source_name) {
  auto impl = std::make_shared<Impl>();
  impl->source = source_name;
  json j;
  try {
    j = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    OPDLM_FAIL_AT(source_name, "", "tokenizer.json is not valid JSON: ", e.what());
  }
  try {
    impl->load(j);
  } catch (const json::exception& e) {  // a value of the wrong JSON type somewhere
    OPDLM_FAIL_AT(source_name, "", "tokenizer.json has a value of the wrong type: ", e.what());
  }
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json_string(read_file(path, "tokenizer file"), path);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  check_utf8(text, "tokenizer encode");
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  auto on_pre = [&](std::string_view w) { impl_->bpe_cached(w, out); };
  impl_->for_each_segment(
      text, [&](std::string_view seg) { impl_->pre_split(seg, 0, on_pre); },
      [&](int32_t id) { out.push_back(id); });
  return out;
}

void Tokenizer::for_each_pretoken(std::string_view text, const std::function<void(std::string_view)>& f) const {
  check_utf8(text, "tokenizer pre-tokenize");
  auto on_pre = [&](std::string_view w) { f(w); };
  impl_->for_each_segment(
      text, [&](std::string_view seg) { impl_->pre_split(seg, 0, on_pre); }, [](int32_t) {});
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids)
    if (id >= 0 && id < impl_->vocab_size && impl_->has_decoded[id]) bytes += impl_->decoded[id];
  return utf8_lossy(bytes);
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end())
    return impl_->added[it->second].id;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (id >= 0 && static_cast<size_t>(id) < impl_->model_tokens.size() && impl_->has_model[id])
    return impl_->model_tokens[id];
  OPDLM_FAIL_AT(impl_->source, "", "token id ", id, " is not in the vocabulary (size ", impl_->vocab_size, ")");
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

void Tokenizer::save(const std::string& path) const {
  const Impl& m = *impl_;
  // Written by hand in HF's key order: a 150k-key ordered JSON object would be slow to build.
  std::string o;
  o.reserve(m.model_tokens.size() * 40 + m.merges_list.size() * 30 + 4096);
  o += "{\n  \"version\": " + dump_at(m.version, 2) + ",\n";
  o += "  \"truncation\": " + dump_at(m.truncation, 2) + ",\n";
  o += "  \"padding\": " + dump_at(m.padding, 2) + ",\n";
  o += "  \"added_tokens\": [";
  std::vector<const AddedToken*> added;
  for (const auto& t : m.added) added.push_back(&t);
  std::sort(added.begin(), added.end(), [](auto* a, auto* b) { return a->id < b->id; });
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = *added[i];
    nlohmann::ordered_json e;
    e["id"] = t.id;
    e["content"] = t.content;
    e["single_word"] = t.single_word;
    e["lstrip"] = t.lstrip;
    e["rstrip"] = t.rstrip;
    e["normalized"] = t.normalized;
    e["special"] = t.special;
    o += (i ? ",\n    " : "\n    ") + dump_at(e, 4);
  }
  o += added.empty() ? "],\n" : "\n  ],\n";
  o += "  \"normalizer\": " + dump_at(m.normalizer_j, 2) + ",\n";
  o += "  \"pre_tokenizer\": " + dump_at(m.pre_tokenizer_j, 2) + ",\n";
  o += "  \"post_processor\": " + dump_at(m.post_processor_j, 2) + ",\n";
  o += "  \"decoder\": " + dump_at(m.decoder_j, 2) + ",\n";
  o += "  \"model\": {\n    \"type\": \"BPE\"";
  static const char* kOrder[] = {"dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                 "fuse_unk", "byte_fallback", "ignore_merges"};
  for (const char* k : kOrder)
    if (m.model_extra.contains(k)) o += ",\n    " + json(k).dump() + ": " + dump_at(m.model_extra[k], 4);
  for (auto it = m.model_extra.begin(); it != m.model_extra.end(); ++it) {
    if (it.key() == "type" || std::find_if(std::begin(kOrder), std::end(kOrder), [&](const char* k) {
                                return it.key() == k;
                              }) != std::end(kOrder))
      continue;
    o += ",\n    " + json(it.key()).dump() + ": " + dump_at(*it, 4);
  }
  o += ",\n    \"vocab\": {";
  bool first = true;
  for (size_t id = 0; id < m.model_tokens.size(); ++id) {
    if (!m.has_model[id]) continue;
    o += first ? "\n      " : ",\n      ";
    first = false;
    o += json(m.model_tokens[id]).dump() + ": " + std::to_string(id);
  }
  o += first ? "},\n" : "\n    },\n";
  o += "    \"merges\": [";
  for (size_t r = 0; r < m.merges_list.size(); ++r) {
    o += r ? ",\n      " : "\n      ";
    const std::string& a = m.model_tokens[m.merges_list[r].first];
    const std::string& b = m.model_tokens[m.merges_list[r].second];
    if (m.merges_as_strings) o += json(a + " " + b).dump();
    else o += "[" + json(a).dump() + ", " + json(b).dump() + "]";
  }
  o += m.merges_list.empty() ? "]\n  }\n}\n" : "\n    ]\n  }\n}\n";
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) OPDLM_FAIL_AT(path, "", "cannot write tokenizer file");
  f.write(o.data(), static_cast<std::streamsize>(o.size()));
  if (!f) OPDLM_FAIL_AT(path, "", "write failed");
}

std::string nfc(std::string_view text) {
  check_utf8(text, "nfc");
  if (is_ascii(text)) return std::string(text);
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                              static_cast<utf8proc_ssize_t>(text.size()), &out,
                              static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) OPDLM_FAIL("nfc (utf8proc): ", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

const std::string& byte_level_char(uint8_t byte) { return alphabet().utf8[byte]; }

}  // namespace opdlm::io
