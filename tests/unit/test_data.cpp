// Tests for the data layer: hashes and the split rule (DataHash), token shards and the keyed
// shuffle (TokenShard), JSONL prompt datasets (JsonlDataset), and the KJV / arithmetic corpora
// (Corpora). KJV tests that need the Debian `bible` program skip without it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "opdlm/io/corpora.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/token_shard.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::io;
using opdlm::test::TempDir;
namespace fs = std::filesystem;

namespace {

void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

Sha256Digest fake_tokenizer_sha() { return sha256("tokenizer.json contents"); }

TokenShard small_shard(int64_t vocab) {
  TokenShard s(vocab, fake_tokenizer_sha());
  const std::vector<int32_t> a = {1, 2, 3}, b = {}, c = {static_cast<int32_t>(vocab - 1), 0, 7, 7, 9};
  s.add_document(a);
  s.add_document(b);
  s.add_document(c);
  return s;
}

// Header field offsets (docs/data_formats.md), restated here so the test pins the format.
constexpr size_t kVersionAt = 8, kDtypeAt = 12, kTokensAt = 16, kDocsAt = 24, kVocabAt = 32, kPayloadCrcAt = 36,
                 kReservedAt = 72, kHeaderCrcAt = 124, kHeader = 128;

// Overwrites bytes of a shard file, then optionally recomputes the checksums so the damage reaches
// the later checks (a hostile header carries valid checksums).
template <class T>
void patch(const std::string& path, size_t at, T value, bool fix_payload_crc, bool fix_header_crc) {
  std::string b = read_bytes(path);
  std::memcpy(b.data() + at, &value, sizeof(T));
  if (fix_payload_crc) {
    const uint32_t crc = crc32c(b.data() + kHeader, b.size() - kHeader);
    std::memcpy(b.data() + kPayloadCrcAt, &crc, 4);
  }
  if (fix_header_crc) {
    const uint32_t crc = crc32c(b.data(), kHeaderCrcAt);
    std::memcpy(b.data() + kHeaderCrcAt, &crc, 4);
  }
  write_file(path, b);
}

// A real (tiny) byte-level BPE: the 256 byte symbols, two merges and <|endoftext|>.
Tokenizer tiny_tokenizer() {
  return Tokenizer::from_json_string(opdlm::test::tiny_bpe_tokenizer_json({{258, "<|endoftext|>"}}), "tiny tokenizer.json");
}

bool have_bible() { return program_available("bible"); }

const std::vector<KjvVerse>& kjv() {
  static const std::vector<KjvVerse> v = load_kjv();
  return v;
}

}  // namespace

// ---- DataHash -------------------------------------------------------------------------------------

TEST(DataHash, Sha256KnownAnswers) {
  // FIPS 180-2 appendix B.1 and the empty string.
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(DataHash, FileHashAndHexRoundTrip) {
  TempDir d;
  std::string big(3 << 20, 'x');  // spans several 1 MiB reads
  big += "tail";
  write_file(d.file("f"), big);
  EXPECT_EQ(sha256_file_hex(d.file("f")), sha256_hex(big));
  EXPECT_EQ(sha256_from_hex(sha256_hex("abc")), sha256("abc"));
  EXPECT_EQ(sha256_from_hex("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"), sha256("abc"));
  EXPECT_ERROR_HAS(sha256_from_hex("abc", "tokenizer_sha256"), "tokenizer_sha256", "64 hex");
  EXPECT_ERROR_HAS(sha256_from_hex(std::string(63, '0') + "g"), "not a hex digit");
  EXPECT_ERROR_HAS(sha256_file_hex(d.file("missing")), "cannot open", "missing");
}

TEST(DataHash, ModMatchesPythonBigInteger) {
  // int(hashlib.sha256(k.encode()).hexdigest(), 16) % m, computed in Python.
  EXPECT_EQ(sha256_mod("Genesis 1", 100), 2u);
  EXPECT_EQ(sha256_mod("John 11", 100), 45u);
  EXPECT_EQ(sha256_mod("John 11", 1000), 845u);
  EXPECT_EQ(sha256_mod("John 13", 1000), 201u);
  EXPECT_EQ(sha256_mod("Revelation 19", 7), 4u);
  EXPECT_EQ(sha256_mod("1,2,+", 100), 89u);
  EXPECT_EQ(sha256_mod("eval|John 11:35", 1000), 970u);
  EXPECT_EQ(sha256_mod("anything", 1), 0u);
}

TEST(DataHash, Crc32cKnownAnswerAndChaining) {
  const std::string s = "123456789";
  EXPECT_EQ(crc32c(s.data(), s.size()), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(crc32c(s.data() + 4, 5, crc32c(s.data(), 4)), 0xE3069283u);
  EXPECT_EQ(crc32c(nullptr, 0), 0u);
}

// ---- TokenShard -----------------------------------------------------------------------------------

TEST(TokenShard, DtypeFollowsVocabSize) {
  EXPECT_EQ(token_dtype_for_vocab(259), TokenDType::u16);
  EXPECT_EQ(token_dtype_for_vocab(65536), TokenDType::u16);
  EXPECT_EQ(token_dtype_for_vocab(65537), TokenDType::u32);
  EXPECT_EQ(token_dtype_for_vocab(151669), TokenDType::u32);
}

TEST(TokenShard, RoundTripU16AndU32) {
  TempDir d;
  for (int64_t vocab : {int64_t{1000}, int64_t{65536}, int64_t{151669}}) {
    const TokenShard s = small_shard(vocab);
    const std::string path = d.file("s" + std::to_string(vocab) + ".bin");
    s.write(path);
    const size_t width = vocab <= 65536 ? 2 : 4;
    EXPECT_EQ(fs::file_size(path), 128 + 8 * 4 + width * 8) << vocab;
    const TokenShard r = TokenShard::read(path);
    EXPECT_EQ(r, s);
    EXPECT_EQ(r.num_documents(), 3u);
    EXPECT_EQ(r.num_tokens(), 8u);
    EXPECT_TRUE(r.document(1).empty());
    EXPECT_EQ(r.document(2)[0], vocab - 1);
    EXPECT_EQ(r.tokenizer_sha256(), fake_tokenizer_sha());
    EXPECT_EQ(r.dtype(), width == 2 ? TokenDType::u16 : TokenDType::u32);
  }
  // An empty shard is valid too.
  TokenShard e(50, fake_tokenizer_sha());
  e.write(d.file("empty.bin"));
  EXPECT_EQ(TokenShard::read(d.file("empty.bin")), e);
}

TEST(TokenShard, WriteIsAtomicAndReplaces) {
  TempDir d;
  const std::string path = d.file("s.bin");
  small_shard(100).write(path);
  TokenShard bigger = small_shard(100);
  bigger.add_document(std::vector<int32_t>{5, 6});
  bigger.write(path);
  EXPECT_EQ(TokenShard::read(path), bigger);
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(d.path())) ++n;
  EXPECT_EQ(n, 1u) << "a temporary file was left behind";
  EXPECT_ERROR_HAS(bigger.write(d.file("no/such/dir/s.bin")), "s.bin", "cannot create temporary file");
}

TEST(TokenShard, RejectsIdsOutsideVocabulary) {
  TokenShard s(10, fake_tokenizer_sha());
  EXPECT_ERROR_HAS(s.add_document(std::vector<int32_t>{1, 10}), "token id 10", "position 1", "[0, 10)");
  EXPECT_ERROR_HAS(s.add_document(std::vector<int32_t>{-1}), "token id -1");
  EXPECT_EQ(s.num_documents(), 0u);
}

TEST(TokenShard, CorruptFilesFailWithFileAndField) {
  TempDir d;
  const std::string good = d.file("good.bin"), bad = d.file("bad.bin");
  small_shard(1000).write(good);  // u16: 128 + 32 offsets + 16 token bytes = 176 bytes
  const std::string bytes = read_bytes(good);
  auto fresh = [&] { write_file(bad, bytes); };

  EXPECT_ERROR_HAS(TokenShard::read(d.file("absent.bin")), "cannot open token shard", "absent.bin");

  write_file(bad, bytes.substr(0, 100));
  EXPECT_ERROR_HAS(TokenShard::read(bad), "truncated", "100 bytes", "bad.bin", "field header");

  fresh();
  patch<char>(bad, 0, 'X', false, false);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "bad magic", "bad.bin", "field magic");

  fresh();
  patch<uint32_t>(bad, kVersionAt, 2, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "unsupported version 2", "field version");

  fresh();  // a flipped header bit, checksums untouched
  patch<uint32_t>(bad, kVocabAt, 1001, false, false);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "header checksum mismatch", "field header_crc32c");

  fresh();
  patch<uint8_t>(bad, kReservedAt + 3, 1, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "reserved header byte 75", "field reserved");

  fresh();
  patch<uint32_t>(bad, kDtypeAt, 3, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "token dtype 3", "field dtype");

  fresh();
  patch<uint32_t>(bad, kVocabAt, 70000, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "u16 tokens cannot hold vocab_size 70000", "field dtype");

  fresh();
  patch<uint32_t>(bad, kVocabAt, 0, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "absurd vocab_size 0", "field vocab_size");

  fresh();  // hostile counts with valid checksums must not allocate
  patch<uint64_t>(bad, kTokensAt, uint64_t{1} << 60, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "absurd token count", "field n_tokens");

  fresh();
  patch<uint64_t>(bad, kDocsAt, ~uint64_t{0}, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "absurd document count", "field n_docs");

  fresh();  // within the limits but larger than the file
  patch<uint64_t>(bad, kTokensAt, uint64_t{1} << 30, false, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "truncated", "header declares", "field n_tokens");

  write_file(bad, bytes.substr(0, bytes.size() - 1));
  EXPECT_ERROR_HAS(TokenShard::read(bad), "truncated", "175 bytes", "header declares 176");

  write_file(bad, bytes + "zz");
  EXPECT_ERROR_HAS(TokenShard::read(bad), "2 trailing bytes", "bad.bin");

  fresh();  // one flipped token byte
  patch<uint8_t>(bad, bytes.size() - 1, static_cast<uint8_t>(bytes.back() ^ 1), false, false);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "payload checksum mismatch", "field payload_crc32c");

  fresh();  // offsets[2] (empty doc end) below offsets[1], checksums valid
  patch<uint64_t>(bad, kHeader + 2 * 8, 1, true, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "offsets decrease at document 1", "field offsets");

  fresh();
  patch<uint64_t>(bad, kHeader + 3 * 8, 7, true, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "last offset is 7", "field offsets");

  fresh();
  patch<uint64_t>(bad, kHeader, 1, true, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "offsets[0] is 1", "field offsets");

  fresh();  // token 0 = 1000 = vocab_size
  patch<uint16_t>(bad, kHeader + 4 * 8, 1000, true, true);
  EXPECT_ERROR_HAS(TokenShard::read(bad), "token 0 has id 1000", "outside vocab_size 1000", "field tokens");

  // The untouched file still reads.
  EXPECT_EQ(TokenShard::read(good), small_shard(1000));
}

TEST(TokenShard, ShuffleIsADeterministicPermutation) {
  const auto p = shuffle_permutation(1000, 5, 0);
  EXPECT_EQ(p, shuffle_permutation(1000, 5, 0));
  std::vector<uint64_t> sorted = p, iota(1000);
  std::sort(sorted.begin(), sorted.end());
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);
  EXPECT_NE(p, iota);
  EXPECT_NE(p, shuffle_permutation(1000, 5, 1)) << "each epoch gets a new order";
  EXPECT_NE(p, shuffle_permutation(1000, 6, 0)) << "each seed gets a new order";
  EXPECT_TRUE(shuffle_permutation(0, 1, 0).empty());
  EXPECT_EQ(shuffle_permutation(1, 1, 0), std::vector<uint64_t>{0});
  // Pinned: the order is part of reproducibility (Philox key seed 1, data_shuffle, step 0).
  EXPECT_EQ(shuffle_permutation(8, 1, 0), (std::vector<uint64_t>{3, 5, 2, 1, 6, 7, 4, 0}));
}

TEST(TokenShard, ShuffledShardPermutesDocuments) {
  TokenShard s(100, fake_tokenizer_sha());
  for (int32_t d = 0; d < 50; ++d) s.add_document(std::vector<int32_t>(static_cast<size_t>(d % 4), d));
  const TokenShard t = s.shuffled(3, 2);
  EXPECT_EQ(t, s.shuffled(3, 2));
  ASSERT_EQ(t.num_documents(), s.num_documents());
  EXPECT_EQ(t.num_tokens(), s.num_tokens());
  const auto perm = shuffle_permutation(50, 3, 2);
  for (uint64_t i = 0; i < 50; ++i) {
    const auto a = t.document(i), b = s.document(perm[i]);
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << i;
  }
}

TEST(TokenShard, SplitDocumentsByFormat) {
  const std::string text = "first line\r\nsecond\n\n  \nthird\nfourth\n";
  EXPECT_EQ(split_documents(text, DocFormat::lines, "", false, "t"),
            (std::vector<std::string>{"first line", "second", "third", "fourth"}));
  EXPECT_EQ(split_documents(text, DocFormat::lines, "", true, "t")[0], "first line\n");
  EXPECT_EQ(split_documents(text, DocFormat::paragraphs, "", false, "t"),
            (std::vector<std::string>{"first line\nsecond", "third\nfourth"}));
  EXPECT_EQ(split_documents(text, DocFormat::text, "", false, "t"), std::vector<std::string>{text});
  const std::string jl = "{\"_header\": {}}\n{\"text\": \"a b\"}\n\n{\"text\": \"c\", \"x\": 1}\n";
  EXPECT_EQ(split_documents(jl, DocFormat::jsonl, "text", false, "in.jsonl"), (std::vector<std::string>{"a b", "c"}));
  EXPECT_ERROR_HAS(split_documents(jl + "{\"body\": \"d\"}\n", DocFormat::jsonl, "text", false, "in.jsonl"),
                   "in.jsonl:5", "field text");
  EXPECT_ERROR_HAS(split_documents("{oops\n", DocFormat::jsonl, "text", false, "in.jsonl"), "in.jsonl:1",
                   "invalid JSON");
  EXPECT_EQ(parse_doc_format("paragraphs"), DocFormat::paragraphs);
  EXPECT_ERROR_HAS(parse_doc_format("csv"), "unknown document format 'csv'");
}

TEST(TokenShard, TokenizedDocumentsRoundTrip) {
  // The path `opdlm data prepare` takes: split, encode, append EOS, write, read, decode.
  TempDir d;
  const Tokenizer tok = tiny_tokenizer();
  const auto eos = tok.token_id("<|endoftext|>");
  ASSERT_TRUE(eos.has_value());
  const auto docs = split_documents("the way\nthither we went\n", DocFormat::lines, "", false, "t");
  TokenShard s(tok.vocab_size(), sha256("tiny"));
  for (const auto& doc : docs) {
    auto ids = tok.encode(doc);
    ids.push_back(*eos);
    s.add_document(ids);
  }
  EXPECT_EQ(s.dtype(), TokenDType::u16);
  s.write(d.file("t.bin"));
  const TokenShard r = TokenShard::read(d.file("t.bin"));
  ASSERT_EQ(r.num_documents(), 2u);
  EXPECT_EQ(tok.decode(r.document(0)), "the way<|endoftext|>");
  EXPECT_EQ(tok.decode(r.document(1)), "thither we went<|endoftext|>");
  EXPECT_EQ(r.document(0)[0], 256) << "'th' merged";
}

// ---- JsonlDataset ---------------------------------------------------------------------------------

TEST(JsonlDataset, RoundTripWithHeader) {
  TempDir d;
  PromptDataset ds;
  ds.header = {{"source", {{"sha256", sha256_hex("src")}}}, {"task", "t"}};
  PromptRecord a;
  a.id = "17";
  a.id_is_int = true;
  a.prompt = "1+2=";
  a.gold = "3";
  a.split = "heldout";
  PromptRecord b;
  b.id = "John 11:35";
  b.prompt = "John 11:35 Jesus";
  b.response = " wept.";
  b.gold = " wept.";
  b.distractors = {" slept.", " said,", " \"quoted\"\n"};
  b.meta = {{"book", "John"}, {"chapter", 11}};
  PromptRecord c;
  c.id = "empty";
  c.prompt = "";
  ds.records = {a, b, c};
  write_prompt_jsonl(d.file("p.jsonl"), ds);
  const PromptDataset r = load_prompt_jsonl(d.file("p.jsonl"));
  EXPECT_EQ(r.header, ds.header);
  EXPECT_EQ(r.records, ds.records);
  // Integer ids stay integers, keys come in a fixed order.
  const std::string text = read_bytes(d.file("p.jsonl"));
  EXPECT_NE(text.find("{\"id\":17,\"split\":\"heldout\",\"prompt\":\"1+2=\",\"gold\":\"3\"}"), std::string::npos) << text;
}

TEST(JsonlDataset, ErrorsNameFileLineAndField) {
  TempDir d;
  const std::string p = d.file("bad.jsonl");
  auto load_with = [&](const std::string& third_line) {
    write_file(p, "{\"id\": 1, \"prompt\": \"a\"}\n\n" + third_line + "\n");
    return load_prompt_jsonl(p);
  };
  const std::string at3 = p + ":3";
  EXPECT_ERROR_HAS(load_with("{\"id\": 2}"), at3.c_str(), "field prompt", "missing required field 'prompt'");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": 5}"), at3.c_str(), "field prompt", "must be a string");
  EXPECT_ERROR_HAS(load_with("{\"prompt\": \"x\"}"), at3.c_str(), "field id", "missing");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2.5, \"prompt\": \"x\"}"), at3.c_str(), "field id", "string or an integer");
  EXPECT_ERROR_HAS(load_with("{\"id\": 1, \"prompt\": \"x\"}"), at3.c_str(), "field id", "duplicate id '1'");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"gold\": [1]}"), at3.c_str(), "field gold");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"distractors\": \"y\"}"), at3.c_str(),
                   "field distractors", "array of strings");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"distractors\": [\"y\", 3]}"), at3.c_str(),
                   "field distractors[1]");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"meta\": [1]}"), at3.c_str(), "field meta",
                   "must be an object");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"golds\": \"y\"}"), at3.c_str(), "field golds",
                   "unknown field");
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\""), at3.c_str(), "invalid JSON");
  // Found by fuzz_jsonl: a number too large for a double is nlohmann's out_of_range, not a parse
  // error; it escaped as an uncaught exception.
  EXPECT_ERROR_HAS(load_with("{\"id\": 2, \"prompt\": \"x\", \"meta\": {\"seed\": 1e6345}}"), at3.c_str(),
                   "invalid JSON", "number overflow");
  EXPECT_ERROR_HAS(load_with("[1, 2]"), at3.c_str(), "must be a JSON object");
  EXPECT_ERROR_HAS(load_with("{\"_header\": {}}"), at3.c_str(), "field _header", "only allowed first");
  EXPECT_ERROR_HAS(load_prompt_jsonl(d.file("none.jsonl")), "none.jsonl", "cannot open");
  // Blank lines and CRLF are fine, and nulls mean absent.
  write_file(p, "\n{\"id\": \"a\", \"prompt\": \"x\", \"gold\": null}\r\n\n");
  const auto ok = load_prompt_jsonl(p);
  ASSERT_EQ(ok.records.size(), 1u);
  EXPECT_FALSE(ok.records[0].gold.has_value());
  EXPECT_TRUE(ok.header.is_null());
}

// ---- Corpora: KJV ----------------------------------------------------------------------------------

TEST(Corpora, KjvParserHandlesBookNamesAndQuirks) {
  const std::string out =
      "\n1 Kings 3\n\n  1 And Solomon made affinity.\n  2 Only the people sacrificed. \n"
      "Song of Solomon 2\n\n  1 I am the rose of Sharon.\n";
  const auto v = parse_kjv(out, "sample");
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].book, "1 Kings");
  EXPECT_EQ(v[0].chapter, 3);
  EXPECT_EQ(v[1].text, "Only the people sacrificed.") << "trailing blank removed";
  EXPECT_EQ(v[2].line(), "Song of Solomon 2:1 I am the rose of Sharon.");
  EXPECT_EQ(v[2].chapter_key(), "Song of Solomon 2");
  EXPECT_ERROR_HAS(parse_kjv("  1 orphan verse\n", "src"), "src:1", "before any");
  EXPECT_ERROR_HAS(parse_kjv("Genesis 1\n  x text\n", "src"), "src:2", "field verse");
  EXPECT_ERROR_HAS(parse_kjv("Genesis\n", "src"), "src:1", "field header");
}

TEST(Corpora, KjvHeldOutChaptersArePinned) {
  // sha256("Book C") % 100 < 5, computed once in Python (../shared/docs/data.md 6.1).
  EXPECT_TRUE(kjv_chapter_held_out("Genesis", 1));
  EXPECT_TRUE(kjv_chapter_held_out("John", 13));
  EXPECT_TRUE(kjv_chapter_held_out("Revelation", 19));
  EXPECT_TRUE(kjv_chapter_held_out("Song of Solomon", 1) == (sha256_mod("Song of Solomon 1", 100) < 5));
  EXPECT_FALSE(kjv_chapter_held_out("John", 11));
  EXPECT_FALSE(kjv_chapter_held_out("Genesis", 2));
  KjvVerse jw{"John", 11, 35, "Jesus wept."};
  EXPECT_FALSE(kjv_seen_eval(jw));  // sha256("eval|John 11:35") % 1000 = 970
}

TEST(Corpora, KjvFullTextFromBibleProgram) {
  if (!have_bible()) GTEST_SKIP() << "the Debian `bible` program (bible-kjv) is not installed";
  const auto& v = kjv();
  ASSERT_EQ(v.size(), kKjvVerseCount);
  EXPECT_EQ(v.front().line(), "Genesis 1:1 In the beginning God created the heaven and the earth.");
  EXPECT_EQ(v.back().ref(), "Revelation 22:21");
  const auto jw = std::find_if(v.begin(), v.end(), [](const KjvVerse& x) { return x.ref() == "John 11:35"; });
  ASSERT_NE(jw, v.end());
  EXPECT_EQ(jw->text, "Jesus wept.");
  // No Psalm superscriptions (data.md section 1).
  const auto ps = std::find_if(v.begin(), v.end(), [](const KjvVerse& x) { return x.ref() == "Psalms 3:1"; });
  ASSERT_NE(ps, v.end());
  EXPECT_EQ(ps->text.rfind("Lord, how are they increased", 0), 0u);
  for (const auto& x : v) ASSERT_FALSE(x.text.empty() || x.text.back() == ' ') << x.ref();
  EXPECT_ERROR_HAS(load_kjv("/nonexistent/bible"), "/nonexistent/bible", "not installed");
}

TEST(Corpora, KjvSplitSizesAreStable) {
  if (!have_bible()) GTEST_SKIP() << "the Debian `bible` program (bible-kjv) is not installed";
  const auto& v = kjv();
  const KjvSplit s = split_kjv(v);
  EXPECT_EQ(s.num_chapters, kKjvChapterCount);
  // Counts from Python's hashlib on the same text (52 of 1,189 chapters = 4.4%).
  EXPECT_EQ(s.heldout_chapters.size(), 52u);
  EXPECT_EQ(s.heldout.size(), 1316u);
  EXPECT_EQ(s.train.size(), 29786u);
  EXPECT_EQ(s.seen_eval.size(), 999u);
  EXPECT_EQ(s.heldout_chapters.front(), "Genesis 1");
  EXPECT_EQ(s.heldout_chapters.back(), "Revelation 19");
  std::set<std::string> held(s.heldout_chapters.begin(), s.heldout_chapters.end());
  for (size_t i : s.train) ASSERT_FALSE(held.count(v[i].chapter_key())) << v[i].ref();
  for (size_t i : s.heldout) ASSERT_TRUE(held.count(v[i].chapter_key())) << v[i].ref();
  for (size_t i : s.seen_eval) ASSERT_TRUE(kjv_seen_eval(v[i])) << v[i].ref();
}

TEST(Corpora, KjvEvalRecords) {
  if (!have_bible()) GTEST_SKIP() << "the Debian `bible` program (bible-kjv) is not installed";
  const auto& v = kjv();
  const KjvSplit s = split_kjv(v);
  const auto seen = kjv_seen_completion(v, s, 3, 3, 0);
  EXPECT_EQ(seen.size(), 997u) << "two seen verses have at most three words";
  EXPECT_EQ(seen, kjv_seen_completion(v, s, 3, 3, 0));
  EXPECT_NE(seen, kjv_seen_completion(v, s, 3, 3, 1)) << "the seed moves the distractors";
  std::map<std::string, const KjvVerse*> by_ref;
  for (const auto& x : v) by_ref[x.ref()] = &x;
  for (const auto& r : seen) {
    const KjvVerse& x = *by_ref.at(r.id);
    ASSERT_EQ(r.prompt + *r.gold, x.line()) << r.id;
    ASSERT_EQ(r.gold->front(), ' ');
    ASSERT_EQ(r.distractors.size(), 3u) << r.id;
    std::set<std::string> uniq(r.distractors.begin(), r.distractors.end());
    ASSERT_EQ(uniq.size(), 3u);
    ASSERT_FALSE(uniq.count(*r.gold));
  }
  EXPECT_EQ(seen.front().prompt, "Genesis 2:10 And a river");
  EXPECT_EQ(*seen.front().gold, " went out of Eden to water the garden; and from thence it was parted, and became "
                                 "into four heads.");
  const auto held = kjv_heldout_records(v, s);
  ASSERT_EQ(held.size(), 1316u);
  EXPECT_EQ(held.front().prompt + *held.front().gold, v.front().line());
  EXPECT_EQ(*held.front().split, "heldout");
}

// ---- Corpora: arithmetic ---------------------------------------------------------------------------

TEST(Corpora, ArithmeticProblemFormat) {
  EXPECT_EQ((ArithProblem{12, 345, '+'}).line(), "12+345=357");
  EXPECT_EQ((ArithProblem{12, 345, '-'}).answer(), "-333");
  EXPECT_EQ((ArithProblem{12, 345, '*'}).prompt(), "12*345=");
  EXPECT_EQ((ArithProblem{12, 345, '*'}).key(), "12,345,*");
  // sha256("0,5,-") % 100 < 10 and sha256("1,2,+") % 100 = 89, from Python.
  EXPECT_TRUE(arithmetic_held_out({0, 5, '-'}));
  EXPECT_TRUE(arithmetic_held_out({1, 2, '*'}));
  EXPECT_FALSE(arithmetic_held_out({1, 2, '+'}));
  const auto recs = arithmetic_records({{7, 8, '*'}}, "heldout");
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].prompt, "7*8=");
  EXPECT_EQ(*recs[0].gold, "56");
  EXPECT_EQ(recs[0].id, "heldout-0");
}

TEST(Corpora, ArithmeticSplitsAreDisjointAndDeterministic) {
  ArithmeticConfig cfg;
  cfg.n_train = 20000;
  cfg.n_eval = 300;
  cfg.seed = 11;
  const ArithmeticSets a = generate_arithmetic(cfg), b = generate_arithmetic(cfg);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.eval_heldout, b.eval_heldout);
  EXPECT_EQ(a.eval_length, b.eval_length);
  EXPECT_EQ(a.eval_seen, b.eval_seen);
  ASSERT_EQ(a.train.size(), 20000u);
  ASSERT_EQ(a.eval_heldout.size(), 300u);
  ASSERT_EQ(a.eval_length.size(), 300u);
  ASSERT_EQ(a.eval_seen.size(), 300u);

  // Sample i depends on (seed, i) only: a shorter run is a prefix.
  ArithmeticConfig small = cfg;
  small.n_train = 100;
  const auto prefix = generate_arithmetic(small).train;
  EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), a.train.begin()));
  ArithmeticConfig other = cfg;
  other.seed = 12;
  EXPECT_NE(generate_arithmetic(other).train, a.train);

  std::set<std::string> train_keys, ops;
  std::set<int> digits;
  for (const auto& p : a.train) {
    ASSERT_FALSE(arithmetic_held_out(p)) << p.key();
    ASSERT_TRUE(p.a >= 0 && p.a <= 999 && p.b >= 0 && p.b <= 999) << p.key();
    train_keys.insert(p.key());
    ops.insert(std::string(1, p.op));
    digits.insert(static_cast<int>(std::to_string(p.a).size()));
  }
  EXPECT_EQ(ops, (std::set<std::string>{"+", "-", "*"}));
  EXPECT_EQ(digits, (std::set<int>{1, 2, 3}));
  std::set<std::string> held_keys;
  for (const auto& p : a.eval_heldout) {
    ASSERT_TRUE(arithmetic_held_out(p)) << p.key();
    ASSERT_FALSE(train_keys.count(p.key())) << p.key();
    ASSERT_TRUE(held_keys.insert(p.key()).second) << "duplicate " << p.key();
  }
  for (const auto& p : a.eval_length) {
    ASSERT_TRUE(p.a >= 1000 && p.a <= 9999 && p.b >= 1000 && p.b <= 9999) << p.key();
    ASSERT_FALSE(train_keys.count(p.key()));
  }
  for (const auto& p : a.eval_seen) ASSERT_TRUE(train_keys.count(p.key())) << p.key();
  // About 10% of the pair space is held out; the rejection keeps train free of it.
  int held = 0;
  for (int x = 0; x < 100; ++x)
    for (int y = 0; y < 30; ++y) held += arithmetic_held_out({x, y, '+'});
  EXPECT_NEAR(held / 3000.0, 0.10, 0.02);
}
