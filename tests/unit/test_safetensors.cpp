// Tests for io/safetensors (exact F16/BF16 conversion, F32/BF16 writer, a table of malformed files
// whose errors must name the file and the tensor, an independent numpy writer/reader) and io/hf
// (bitwise import/export round trips incl. shards, directory checks against config.json, atomic
// export, the import-hf/export-hf commands).
#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "opdlm/io/file_util.hpp"
#include "opdlm/io/hf.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/safetensors.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::io;
using opdlm::test::TempDir;
namespace fs = std::filesystem;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A safetensors file from a literal header and data bytes (no padding, any content).
std::string st_bytes(const std::string& header, const std::string& data, uint64_t header_len_override = 0) {
  uint64_t n = header_len_override ? header_len_override : header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  // nbytes() == 0: empty tensors have no storage (memcmp of null pointers is undefined, UBSan).
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0);
}

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }

model::Qwen3Config tiny_config(bool tied) {
  model::Qwen3Config c;
  c.vocab_size = 40;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;  // q_dim 32 != hidden_size, as in real Qwen3
  c.tie_word_embeddings = tied;
  c.eos_token_id = 3;
  return c;
}

model::Qwen3Weights tiny_weights(bool tied, uint32_t seed) {
  model::Qwen3Weights w(tiny_config(tied));
  w.init_random(seed, 0.5);
  // Norm gains are all ones after init: make them distinct so a swapped tensor would show.
  for (auto& t : w.tensors())
    if (t.value.ndim() == 1)
      for (int64_t i = 0; i < t.value.numel(); ++i) t.value.data<float>()[i] = 1.0f + 0.01f * float(i);
  return w;
}

void expect_weights_bitwise(const model::Qwen3Weights& a, const model::Qwen3Weights& b) {
  ASSERT_EQ(a.config(), b.config());
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    EXPECT_EQ(a.tensors()[i].name, b.tensors()[i].name);
    EXPECT_TRUE(same_bits(a.tensors()[i].value, b.tensors()[i].value)) << a.tensors()[i].name;
  }
}

// name -> bytes of every file in a directory (non-recursive).
std::map<std::string, std::string> dir_contents(const fs::path& d) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::directory_iterator(d)) m[e.path().filename().string()] = test::read_file_bytes(e.path().string());
  return m;
}

std::string source_dir() { return fs::path(__FILE__).parent_path().parent_path().string(); }

}  // namespace

// ---- conversions -----------------------------------------------------------------------------

TEST(Safetensors, F16KnownBitPatterns) {
  EXPECT_EQ(f16_bits_to_f32(0x0000), 0.0f);
  EXPECT_EQ(bits_of(f16_bits_to_f32(0x8000)), 0x80000000u);           // -0
  EXPECT_EQ(f16_bits_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_bits_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_bits_to_f32(0x7bff), 65504.0f);                       // largest finite
  EXPECT_EQ(f16_bits_to_f32(0x0400), std::ldexp(1.0f, -14));          // smallest normal
  EXPECT_EQ(f16_bits_to_f32(0x0001), std::ldexp(1.0f, -24));          // smallest subnormal
  EXPECT_EQ(f16_bits_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_bits_to_f32(0x03ff), std::ldexp(1023.0f, -24));       // largest subnormal
  EXPECT_EQ(f16_bits_to_f32(0x0200), std::ldexp(1.0f, -15));
  EXPECT_EQ(f16_bits_to_f32(0x3555), 0.333251953125f);
  EXPECT_EQ(bits_of(f16_bits_to_f32(0x7c00)), 0x7f800000u);           // +inf
  EXPECT_EQ(bits_of(f16_bits_to_f32(0xfc00)), 0xff800000u);           // -inf
  EXPECT_EQ(bits_of(f16_bits_to_f32(0x7e00)), 0x7fc00000u);           // quiet NaN
  EXPECT_EQ(bits_of(f16_bits_to_f32(0x7c01)), 0x7f802000u);           // payload kept (as numpy)
  // Every finite pattern against sign * mantissa * 2^exponent computed in double.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint32_t e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) continue;
    const double mag = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), int(e) - 25);
    const double ref = (h & 0x8000) ? -mag : mag;
    ASSERT_EQ(bits_of(f16_bits_to_f32(uint16_t(h))), bits_of(float(ref))) << std::hex << h;
  }
}

TEST(Safetensors, Bf16StorageIsExactForBf16Values) {
  // Every bf16 pattern, NaNs (signalling too) included, survives bf16 -> f32 -> storage.
  for (uint32_t b = 0; b < 0x10000; ++b)
    ASSERT_EQ(f32_to_bf16_storage(bf16_bits_to_f32(uint16_t(b))), b) << std::hex << b;
  // Other values round to nearest even like the tensor conversion.
  EXPECT_EQ(f32_to_bf16_storage(std::bit_cast<float>(0x3f808000u)), 0x3f80);
  EXPECT_EQ(f32_to_bf16_storage(std::bit_cast<float>(0x3f818000u)), 0x3f82);
  EXPECT_EQ(f32_to_bf16_storage(std::bit_cast<float>(0x3f808001u)), 0x3f81);
}

// ---- writer / reader ---------------------------------------------------------------------------

TEST(Safetensors, WriteReadRoundTripF32AndBf16) {
  TempDir tmp;
  Tensor a = test::random_tensor({3, 5}, 7, -3, 3, DType::f32);
  a.data<float>()[0] = INFINITY;
  a.data<float>()[1] = -0.0f;
  a.data<float>()[2] = std::bit_cast<float>(0x7fa00001u);  // NaN with a payload
  Tensor b = test::random_tensor({7}, 8, -1, 1, DType::f32).to(DType::bf16);
  Tensor empty({0, 4});
  std::vector<model::NamedTensor> ts = {{"a", a}, {"b.bf16", b}, {"e", empty}};

  const std::string f32 = tmp / "f32.safetensors";
  write_safetensors(f32, ts, StoreDType::f32);
  SafetensorsFile r(f32);
  EXPECT_EQ(r.metadata().at("format"), "pt");
  ASSERT_EQ(r.entries().size(), 3u);
  EXPECT_EQ(r.entries()[0].name, "a");  // data in the given order
  EXPECT_EQ(r.entry("b.bf16").dtype, StDType::F32);
  EXPECT_TRUE(same_bits(r.read_f32("a"), a));
  EXPECT_TRUE(same_bits(r.read("b.bf16", DType::bf16), b));  // bf16 -> F32 -> bf16 is exact
  EXPECT_EQ(r.read_f32("e").shape(), (Shape{0, 4}));
  uint64_t hl = 0;
  std::memcpy(&hl, test::read_file_bytes(f32).data(), 8);
  EXPECT_EQ(hl % 8, 0u);  // header padded so the data is 8-byte aligned

  const std::string bf = tmp / "bf16.safetensors";
  write_safetensors(bf, ts, StoreDType::bf16, {{"k", "v"}});
  SafetensorsFile rb(bf);
  EXPECT_EQ(rb.metadata().at("k"), "v");
  EXPECT_EQ(rb.entry("a").dtype, StDType::BF16);
  EXPECT_TRUE(same_bits(rb.read("b.bf16", DType::bf16), b));
  Tensor ab = rb.read("a", DType::bf16);
  for (int64_t i = 0; i < a.numel(); ++i)
    EXPECT_EQ(ab.data<bf16>()[i].bits, f32_to_bf16_storage(a.data<float>()[i])) << i;
  // Writing what was read reproduces the file byte for byte.
  std::vector<model::NamedTensor> again = {{"a", rb.read_f32("a")}, {"b.bf16", rb.read_f32("b.bf16")}, {"e", empty}};
  write_safetensors(tmp / "bf16_again.safetensors", again, StoreDType::bf16, {{"k", "v"}});
  EXPECT_EQ(test::read_file_bytes(tmp / "bf16_again.safetensors"), test::read_file_bytes(bf));
}

TEST(Safetensors, ReadsF16AndUnpaddedHandWrittenFile) {
  TempDir tmp;
  // f16: 1, -2, 2^-24 (subnormal), inf; header keys out of data order, no padding.
  std::string data;
  for (uint16_t h : {0x3c00, 0xc000, 0x0001, 0x7c00}) data.append(reinterpret_cast<const char*>(&h), 2);
  const float x = 0.25f;
  data.append(reinterpret_cast<const char*>(&x), 4);
  write_bytes(tmp / "h.safetensors",
              st_bytes(R"({"y":{"dtype":"F32","shape":[],"data_offsets":[8,12]},"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}})", data));
  SafetensorsFile r(tmp / "h.safetensors");
  EXPECT_EQ(r.entries()[0].name, "x");
  Tensor t = r.read_f32("x");
  EXPECT_EQ(t.shape(), (Shape{2, 2}));
  EXPECT_EQ(t.data<float>()[0], 1.0f);
  EXPECT_EQ(t.data<float>()[1], -2.0f);
  EXPECT_EQ(t.data<float>()[2], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(t.data<float>()[3]));
  EXPECT_EQ(r.read_f32("y").item(0), 0.25);
  EXPECT_TRUE(r.metadata().empty());
  EXPECT_ERROR_HAS(r.entry("nope"), "h.safetensors", "nope");
}

TEST(Safetensors, MalformedFilesNameFileAndTensor) {
  TempDir tmp;
  const std::string f16x4(16, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    std::vector<const char*> fragments;
  };
  const std::string ok_a = R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})";
  std::vector<Case> cases = {
      {"too_short", "abc", {"too short", "header"}},
      {"bad_json", st_bytes(R"({"a": {"dtype": "F32",)", f16x4), {"bad header JSON", "header"}},
      {"not_object_start", st_bytes("[1,2]", ""), {"must start with '{'"}},
      {"header_beyond_file", st_bytes("{" + ok_a + "}", f16x4, 4096), {"exceeds the file", "header"}},
      {"absurd_header", st_bytes("{}", "", 1ull << 40), {"absurd", "header"}},
      {"unknown_dtype", st_bytes(R"({"a":{"dtype":"F33","shape":[4],"data_offsets":[0,16]}})", f16x4),
       {"unknown dtype 'F33'", "field a"}},
      {"offsets_out_of_range", st_bytes(R"({"a":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}})", f16x4),
       {"reach past the end", "field a"}},
      {"overlap",
       st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                std::string(24, '\0')),
       {"overlap tensor 'a'", "field b"}},
      {"gap",
       st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}})",
                std::string(36, '\0')),
       {"gap of 4 bytes after tensor 'a'", "field b"}},
      {"gap_at_start", st_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}})", f16x4),
       {"gap", "start of the data", "field a"}},
      {"trailing_bytes", st_bytes("{" + ok_a + "}", f16x4 + "xxxx"), {"4 bytes after the last tensor 'a'", "field a"}},
      {"shape_span_mismatch", st_bytes(R"({"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", f16x4),
       {"needs 20 bytes", "span 16", "field a"}},
      {"dtype_span_mismatch", st_bytes(R"({"a":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}})", f16x4),
       {"of F16 needs 8 bytes", "field a"}},
      {"negative_dim", st_bytes(R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", f16x4),
       {"negative dimension", "field a"}},
      {"fractional_dim", st_bytes(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,16]}})", f16x4),
       {"non-integer", "field a"}},
      {"overflowing_dims",
       st_bytes(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", f16x4),
       {"more than 2^64", "field a"}},
      {"reversed_offsets", st_bytes(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", f16x4),
       {"end before they begin", "field a"}},
      {"missing_offsets", st_bytes(R"({"a":{"dtype":"F32","shape":[4]}})", f16x4), {"data_offsets", "field a"}},
      {"bad_metadata", st_bytes(R"({"__metadata__":{"format":1},)" + ok_a + "}", f16x4),
       {"must be strings", "__metadata__.format"}},
      {"duplicate_name", st_bytes("{" + ok_a + "," + ok_a + "}", f16x4), {"appears twice", "field a"}},
  };
  // Truncated data: a valid file cut 4 bytes short.
  {
    std::string good = st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                std::string(24, '\0'));
    cases.push_back({"truncated", good.substr(0, good.size() - 4), {"reach past the end", "truncated", "field w"}});
  }
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = tmp / (std::string(c.what) + ".safetensors");
    write_bytes(path, c.bytes);
    const std::string msg = test::error_of([&] { SafetensorsFile f(path); });
    ASSERT_FALSE(msg.empty()) << "no error";
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    for (const char* part : c.fragments) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  }
  // Integer tensors validate, but are not floats.
  const std::string ints = tmp / "ints.safetensors";
  write_bytes(ints, st_bytes(R"({"ids":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}})", f16x4));
  SafetensorsFile fi(ints);
  EXPECT_ERROR_HAS(fi.read_f32("ids"), "ints.safetensors", "ids", "I32");
  EXPECT_ERROR_HAS(SafetensorsFile(tmp / "missing.safetensors"), "missing.safetensors", "cannot open");
}

TEST(Safetensors, WriterRejectsBadInputAndKeepsOldFile) {
  TempDir tmp;
  const std::string p = tmp / "w.safetensors";
  write_safetensors(p, {{"a", Tensor::full({2}, 1.0)}}, StoreDType::f32);
  const std::string before = test::read_file_bytes(p);
  EXPECT_ERROR_HAS(write_safetensors(p, {{"a", Tensor({2})}, {"a", Tensor({2})}}, StoreDType::f32), "given twice", "a");
  EXPECT_ERROR_HAS(write_safetensors(p, {{"i", Tensor({2}, DType::i32)}}, StoreDType::f32), "f32 or bf16", "i");
  EXPECT_EQ(test::read_file_bytes(p), before);
  EXPECT_FALSE(fs::exists(temp_path_for(p)));
}

// An independent writer and reader: numpy + json + struct (tests/tools/safetensors_ref.py).
TEST(Safetensors, MatchesIndependentNumpyImplementation) {
  const std::string py = "/usr/bin/python3", script = source_dir() + "/tools/safetensors_ref.py";
  if (!fs::exists(py) || !fs::exists(script) || std::system((py + " -c 'import numpy' 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "python3 with numpy not available";
  TempDir tmp;
  ASSERT_EQ(std::system((py + " " + script + " write " + tmp.path().string()).c_str()), 0);
  SafetensorsFile got(tmp / "py.safetensors"), want(tmp / "py_expected.safetensors");
  EXPECT_EQ(got.metadata().at("writer"), "numpy");
  ASSERT_EQ(got.entries().size(), want.entries().size());
  for (const auto& e : want.entries()) {
    SCOPED_TRACE(e.name);
    EXPECT_TRUE(same_bits(got.read_f32(e.name), want.read_f32(e.name)));  // all 65536 f16 patterns included
  }
  // The other direction: Python parses what we write.
  Tensor a = test::random_tensor({4, 3}, 11, -2, 2, DType::f32);
  std::vector<model::NamedTensor> ts = {{"z.first", a}, {"a.second", a.to(DType::bf16)}};
  const std::string mine = tmp / "cpp.safetensors";
  write_safetensors(mine, ts, StoreDType::bf16);
  const std::string out = tmp / "check.txt";
  ASSERT_EQ(std::system((py + " " + script + " check " + mine + " > " + out).c_str()), 0);
  SafetensorsFile r(mine);
  std::string expect;
  for (const char* n : {"a.second", "z.first"})
    expect += std::string(n) + " BF16 4x3 " + sha256_hex(r.raw(n), r.entry(n).end - r.entry(n).begin) + "\n";
  EXPECT_EQ(test::read_file_bytes(out), expect);
}

// ---- Hugging Face directories -------------------------------------------------------------------

TEST(HfInterchange, RoundTripF32IsBitwise) {
  TempDir tmp;
  model::Qwen3Weights w = tiny_weights(/*tied=*/false, 1);
  export_hf(w, tmp / "a");
  EXPECT_TRUE(fs::exists(tmp / "a/model.safetensors"));
  EXPECT_FALSE(fs::exists(tmp / "a/model.safetensors.index.json"));
  model::Qwen3Weights back = import_hf(tmp / "a");
  expect_weights_bitwise(w, back);
  nlohmann::json cfg = nlohmann::json::parse(test::read_file_bytes(tmp / "a/config.json"));
  EXPECT_EQ(cfg["torch_dtype"], "float32");
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  export_hf(back, tmp / "b");
  EXPECT_EQ(dir_contents(tmp.path() / "a"), dir_contents(tmp.path() / "b"));
}

TEST(HfInterchange, ExportKeepsBaseConfigFields) {
  TempDir tmp;
  HfExportOptions o;
  o.base_config = {{"eos_token_id", {3, 7}}, {"use_cache", true}, {"hidden_size", 999}, {"torch_dtype", "bfloat16"}};
  export_hf(tiny_weights(true, 9), tmp / "a", o);
  auto cfg = nlohmann::json::parse(test::read_file_bytes(tmp / "a/config.json"));
  EXPECT_EQ(cfg["use_cache"], true);                      // unknown to opdlm: kept
  EXPECT_EQ(cfg["eos_token_id"], nlohmann::json({3, 7}));  // list starting with our id: kept
  EXPECT_EQ(cfg["hidden_size"], 16);                      // ours wins
  EXPECT_EQ(cfg["torch_dtype"], "float32");               // what the files hold
  EXPECT_EQ(import_hf(tmp / "a").config(), tiny_config(true));
}

TEST(HfInterchange, RoundTripBf16AndShardedIsBitwise) {
  TempDir tmp;
  model::Qwen3Weights w = tiny_weights(/*tied=*/true, 2);
  HfExportOptions o;
  o.dtype = StoreDType::bf16;
  o.shard_size_bytes = 1500;  // several shards; the 40x16 embedding alone exceeds it
  export_hf(w, tmp / "a", o);
  ASSERT_TRUE(fs::exists(tmp / "a/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(tmp / "a/model.safetensors"));
  auto index = nlohmann::json::parse(test::read_file_bytes(tmp / "a/model.safetensors.index.json"));
  const size_t n_shards = std::count_if(fs::directory_iterator(tmp.path() / "a"), fs::directory_iterator(),
                                        [](const auto& e) { return e.path().extension() == ".safetensors"; });
  EXPECT_GT(n_shards, 2u);
  EXPECT_EQ(index["weight_map"]["model.embed_tokens.weight"], "model-00001-of-" + std::string(5 - std::to_string(n_shards).size(), '0') + std::to_string(n_shards) + ".safetensors");
  EXPECT_EQ(index["metadata"]["total_size"], w.numel() * 2);
  EXPECT_EQ(nlohmann::json::parse(test::read_file_bytes(tmp / "a/config.json"))["torch_dtype"], "bfloat16");

  model::Qwen3Weights x1 = import_hf(tmp / "a");  // f32 holding bf16 values
  for (size_t i = 0; i < w.tensors().size(); ++i) {  // equals w rounded to bf16
    const Tensor& src = w.tensors()[i].value;
    const Tensor& got = x1.tensors()[i].value;
    for (int64_t k = 0; k < src.numel(); ++k)
      ASSERT_EQ(bits_of(got.data<float>()[k]), uint32_t(f32_to_bf16_storage(src.data<float>()[k])) << 16);
  }
  export_hf(x1, tmp / "b", o);
  EXPECT_EQ(dir_contents(tmp.path() / "a"), dir_contents(tmp.path() / "b"));  // byte-identical files
  expect_weights_bitwise(x1, import_hf(tmp / "b"));
  // bf16 weights straight from the file, and back out as bf16: still identical.
  model::Qwen3Weights xb = import_hf(tmp / "a", DType::bf16);
  EXPECT_EQ(xb.dtype(), DType::bf16);
  export_hf(xb, tmp / "c", o);
  EXPECT_EQ(dir_contents(tmp.path() / "a"), dir_contents(tmp.path() / "c"));
  // f32 sharded round trip.
  HfExportOptions of;
  of.shard_size_bytes = 3000;
  export_hf(w, tmp / "d", of);
  EXPECT_TRUE(fs::exists(tmp / "d/model.safetensors.index.json"));
  expect_weights_bitwise(w, import_hf(tmp / "d"));
}

TEST(HfInterchange, ThroughModelFileIsBitwise) {
  TempDir tmp;
  HfExportOptions o;
  o.dtype = StoreDType::bf16;
  o.shard_size_bytes = 4000;
  export_hf(tiny_weights(false, 3), tmp / "hf", o);
  model::Qwen3Weights a = import_hf(tmp / "hf");
  save_model(tmp / "m.h5", a);
  model::Qwen3Weights b = load_model(tmp / "m.h5");
  expect_weights_bitwise(a, b);
  export_hf(b, tmp / "hf2", o);
  EXPECT_EQ(dir_contents(tmp.path() / "hf"), dir_contents(tmp.path() / "hf2"));
}

TEST(HfInterchange, MalformedDirectoriesNameFileAndTensor) {
  TempDir tmp;
  const model::Qwen3Weights w = tiny_weights(true, 4);
  const std::string embed = "model.embed_tokens.weight", q0 = "model.layers.0.self_attn.q_proj.weight";
  // A directory with config.json of `w` and one model.safetensors holding `ts`.
  auto make = [&](const std::string& name, std::vector<model::NamedTensor> ts) {
    export_hf(w, tmp / name);
    write_safetensors(tmp / (name + "/model.safetensors"), ts, StoreDType::f32);
    return tmp / name;
  };
  auto with = [&](auto edit) {
    std::vector<model::NamedTensor> ts;
    for (const auto& t : w.tensors()) ts.push_back({t.name, t.value.clone()});
    edit(ts);
    return ts;
  };
  {
    auto d = make("missing", with([&](auto& ts) { ts.erase(ts.begin() + 3); }));
    const std::string file = d + "/model.safetensors";
    EXPECT_ERROR_HAS(import_hf(d), file.c_str(), w.tensors()[3].name.c_str(), "missing");
  }
  {
    auto d = make("shape", with([&](auto& ts) { ts[1].value = Tensor({17}); }));  // input_layernorm of layer 0
    const std::string file = d + "/model.safetensors";
    EXPECT_ERROR_HAS(import_hf(d), file.c_str(), "model.layers.0.input_layernorm.weight",
                     "shape [17]", "config.json", "hidden_size=16", "[16]");
  }
  {
    auto d = make("unexpected", with([&](auto& ts) { ts.push_back({"model.layers.2.mlp.up_proj.weight", Tensor({24, 16})}); }));
    EXPECT_ERROR_HAS(import_hf(d), "model.layers.2.mlp.up_proj.weight", "unexpected tensor", d.c_str());
  }
  {
    auto d = make("inv_freq", with([&](auto& ts) { ts.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", Tensor({4})}); }));
    expect_weights_bitwise(w, import_hf(d));  // ignorable buffer
  }
  {
    auto d = make("tied_equal", with([&](auto& ts) { ts.push_back({"lm_head.weight", w.tensors()[0].value.clone()}); }));
    expect_weights_bitwise(w, import_hf(d));
    auto d2 = make("tied_differs", with([&](auto& ts) { ts.push_back({"lm_head.weight", Tensor({40, 16})}); }));
    EXPECT_ERROR_HAS(import_hf(d2), "lm_head.weight", "differs", "tie_word_embeddings");
  }
  {
    // A dtype the config cannot use: rewrite a tensor's entry as I32 by hand.
    auto d = make("dtype", with([&](auto&) {}));
    std::string bytes = test::read_file_bytes(d + "/model.safetensors");
    const size_t at = bytes.find("\"model.norm.weight\":{\"dtype\":\"F32\"");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(bytes.find("F32", at), 3, "I32");
    write_bytes(d + "/model.safetensors", bytes);
    const std::string file = d + "/model.safetensors";
    EXPECT_ERROR_HAS(import_hf(d), "model.norm.weight", "dtype I32", file.c_str());
  }
  {
    auto d = make("no_weights", with([&](auto&) {}));
    fs::remove(d + "/model.safetensors");
    EXPECT_ERROR_HAS(import_hf(d), d.c_str(), "no model.safetensors");
    fs::remove(d + "/config.json");
    EXPECT_ERROR_HAS(import_hf(d), "config.json", "cannot open");
  }
  // Sharded directories: index and shards must agree.
  HfExportOptions o;
  o.shard_size_bytes = 3000;
  auto sharded = [&](const std::string& name) {
    export_hf(w, tmp / name, o);
    return tmp / name;
  };
  auto edit_index = [&](const std::string& d, auto edit) {
    auto j = nlohmann::json::parse(test::read_file_bytes(d + "/model.safetensors.index.json"));
    edit(j);
    write_bytes(d + "/model.safetensors.index.json", j.dump());
  };
  {
    auto d = sharded("idx_missing_shard");
    edit_index(d, [&](auto& j) { j["weight_map"][q0] = "model-00009-of-00009.safetensors"; });
    EXPECT_ERROR_HAS(import_hf(d), "model-00009-of-00009.safetensors", "cannot open");
  }
  {
    auto d = sharded("idx_wrong_shard");
    std::string other;
    edit_index(d, [&](auto& j) {
      other = j["weight_map"][embed].template get<std::string>();  // the first shard; q0 lives in a later one
      ASSERT_NE(j["weight_map"][q0], other);
      j["weight_map"][q0] = other;
    });
    const std::string file = d + "/" + other;
    EXPECT_ERROR_HAS(import_hf(d), q0.c_str(), file.c_str(), "missing from this shard");
  }
  {
    // q0 fills a shard alone: unlisted, that shard is never opened and q0 is missing.
    auto d = sharded("idx_unlisted");
    edit_index(d, [&](auto& j) { j["weight_map"].erase(q0); });
    EXPECT_ERROR_HAS(import_hf(d), q0.c_str(), "model.safetensors.index.json", "missing");
    // The first layer norm shares the embedding's shard: unlisted, it is a stray tensor there.
    const std::string n0 = "model.layers.0.input_layernorm.weight";
    auto d2 = sharded("idx_stray");
    std::string shard;
    edit_index(d2, [&](auto& j) {
      shard = j["weight_map"][n0].template get<std::string>();
      ASSERT_EQ(j["weight_map"][embed], shard);
      j["weight_map"].erase(n0);
    });
    const std::string file = d2 + "/" + shard;
    EXPECT_ERROR_HAS(import_hf(d2), n0.c_str(), file.c_str(), "does not list it");
  }
  {
    auto d = sharded("idx_escape");
    edit_index(d, [&](auto& j) { j["weight_map"][q0] = "../x.safetensors"; });
    EXPECT_ERROR_HAS(import_hf(d), "model.safetensors.index.json", q0.c_str(), "plain file name");
  }
}

TEST(HfInterchange, FailedExportKeepsPreviousDirectory) {
  TempDir tmp;
  const std::string out = tmp / "out";
  HfExportOptions o;
  o.shard_size_bytes = 2000;
  export_hf(tiny_weights(false, 5), out, o);
  write_bytes(out + "/tokenizer.json", "{\"tok\": 1}");  // a file the export must carry over
  const auto before = dir_contents(out);
  model::Qwen3Weights bad = tiny_weights(false, 6);
  bad.tensors().back().value = Tensor({3, 3});  // lm_head: fails after earlier shards are written
  EXPECT_ERROR_HAS(export_hf(bad, out, o), "lm_head.weight", "does not match");
  EXPECT_EQ(dir_contents(out), before);
  EXPECT_FALSE(fs::exists(temp_path_for(out)));
  // A good export replaces the model files and keeps the tokenizer.
  model::Qwen3Weights good = tiny_weights(false, 7);
  export_hf(good, out);
  EXPECT_EQ(test::read_file_bytes(out + "/tokenizer.json"), "{\"tok\": 1}");
  EXPECT_FALSE(fs::exists(out + "/model.safetensors.index.json"));  // old shards are gone
  expect_weights_bitwise(good, import_hf(out));
}

// The commands end to end, when the opdlm binary sits beside the tests' build tree.
TEST(HfInterchange, CommandsImportExportAndKeepOutputOnFailure) {
  const fs::path exe = fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "opdlm";
  if (!fs::exists(exe)) GTEST_SKIP() << exe << " not built";
  TempDir tmp;
  model::Qwen3Weights w = tiny_weights(true, 8);
  HfExportOptions o;
  o.dtype = StoreDType::bf16;
  export_hf(w, tmp / "hf", o);
  auto run = [&](const std::string& args) {
    return std::system((exe.string() + " " + args + " > " + (tmp / "log.txt") + " 2>&1").c_str());
  };
  ASSERT_EQ(run("import-hf --from " + (tmp / "hf") + " --out " + (tmp / "m.h5")), 0) << test::read_file_bytes(tmp / "log.txt");
  ASSERT_EQ(run("export-hf --model " + (tmp / "m.h5") + " --out " + (tmp / "hf2") + " --dtype bf16"), 0)
      << test::read_file_bytes(tmp / "log.txt");
  EXPECT_EQ(dir_contents(tmp.path() / "hf"), dir_contents(tmp.path() / "hf2"));
  // A failing import leaves the existing model file as it was, exits non-zero with the reason.
  const std::string good = test::read_file_bytes(tmp / "m.h5");
  fs::remove(tmp / "hf/model.safetensors");
  EXPECT_NE(run("import-hf --from " + (tmp / "hf") + " --out " + (tmp / "m.h5")), 0);
  EXPECT_NE(test::read_file_bytes(tmp / "log.txt").find("no model.safetensors"), std::string::npos) << test::read_file_bytes(tmp / "log.txt");
  EXPECT_EQ(test::read_file_bytes(tmp / "m.h5"), good);
  // A failing export (corrupt model file) leaves the existing directory as it was.
  const auto before = dir_contents(tmp.path() / "hf2");
  std::string broken = good;
  broken.resize(broken.size() / 2);
  write_bytes(tmp / "broken.h5", broken);
  EXPECT_NE(run("export-hf --model " + (tmp / "broken.h5") + " --out " + (tmp / "hf2")), 0);
  EXPECT_NE(test::read_file_bytes(tmp / "log.txt").find("broken.h5"), std::string::npos) << test::read_file_bytes(tmp / "log.txt");
  EXPECT_EQ(dir_contents(tmp.path() / "hf2"), before);
}
