// Implementation of the shared test helpers (random tensors, finite differences, golden reader).
#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include "opdlm/io/bpe_trainer.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/tokenizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <unistd.h>

namespace opdlm::test {

Tensor random_tensor(const Shape& shape, uint32_t seed, double lo, double hi, DType dtype) {
  CounterRng rng(RngKey{seed, RngPurpose::test, 0, 0, 0});
  Tensor t = Tensor::empty(shape, DType::f64);
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i)
    p[i] = lo + (hi - lo) * rng.uniform_open_f64(static_cast<uint32_t>(i));
  return dtype == DType::f64 ? t : t.to(dtype);
}

Tensor random_ids(const Shape& shape, uint32_t seed, int32_t vocab) {
  CounterRng rng(RngKey{seed, RngPurpose::test, 1, 0, 0});
  CounterRng::Cursor cur(rng);
  Tensor t = Tensor::empty(shape, DType::i32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = static_cast<int32_t>(cur.below(vocab));
  return t;
}

Tensor numeric_grad(const std::function<double()>& f, Tensor& x, double eps) {
  Tensor g = Tensor::zeros(x.shape(), DType::f64);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double v = x.item(i);
    auto set = [&](double nv) {
      if (x.dtype() == DType::f64) x.data<double>()[i] = nv;
      else x.data<float>()[i] = static_cast<float>(nv);
    };
    set(v + eps);
    const double fp = f();
    set(v - eps);
    const double fm = f();
    set(v);
    g.data<double>()[i] = (fp - fm) / (2 * eps);
  }
  return g;
}

double max_abs_err(const Tensor& a, const Tensor& b) {
  if (a.numel() != b.numel())
    OPDLM_FAIL("comparing ", a.describe(), " with ", b.describe(), ": sizes differ");
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.item(i) - b.item(i)));
  return m;
}

double max_rel_err(const Tensor& a, const Tensor& b, double floor) {
  double scale = floor;
  for (int64_t i = 0; i < b.numel(); ++i) scale = std::max(scale, std::fabs(b.item(i)));
  return max_abs_err(a, b) / scale;
}

double dot(const Tensor& a, const Tensor& b) {
  if (a.numel() != b.numel()) OPDLM_FAIL("dot of ", a.describe(), " and ", b.describe());
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

TempDir::TempDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = info ? std::string(info->test_suite_name()) + "_" + info->name() : "none";
  path_ = std::filesystem::temp_directory_path() / ("opdlm_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<ops::MaskDescriptor> mask_descriptors_from_golden(const Tensor& p) {
  std::vector<ops::MaskDescriptor> out;
  for (int64_t r = 0; r < p.size(0); ++r) {
    auto f = [&](int c) { return static_cast<int64_t>(p.item(r * 6 + c)); };
    switch (f(0)) {
      case 0: out.push_back(ops::MaskDescriptor::causal(f(2), f(5))); break;
      case 1: out.push_back(ops::MaskDescriptor::block_causal(f(1), f(3), f(2), f(5))); break;
      default: out.push_back(ops::MaskDescriptor::training(f(1), f(3), f(4), f(2))); break;
    }
  }
  return out;
}

void record_error(const std::string& key, double err) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", err);
  ::testing::Test::RecordProperty(key, buf);
}

std::string golden_dir() {
  if (const char* d = std::getenv("OPDLM_GOLDEN_DIR")) return d;
#ifdef OPDLM_GOLDEN_DIR_DEFAULT
  return OPDLM_GOLDEN_DIR_DEFAULT;
#else
  return "golden";
#endif
}

// Format (little endian), written by tests/golden/golden_io.py:
//   "OPDG" u32 version=1 u32 count, then per entry: u32 name_len, name bytes, u8 dtype
//   (0 f32, 1 f64, 3 i32), u32 ndim, i64 dims[ndim], raw row-major data.
Golden load_golden(const std::string& group) {
  const std::string path = golden_dir() + "/" + group + ".bin";
  std::ifstream in(path, std::ios::binary);
  if (!in) OPDLM_FAIL_AT(path, "", "golden file missing: run the ctest fixture 'golden' (tests/golden/gen_all.py)");
  auto rd = [&](void* p, size_t n) {
    in.read(static_cast<char*>(p), static_cast<std::streamsize>(n));
    if (!in) OPDLM_FAIL_AT(path, "", "golden file truncated");
  };
  char magic[4];
  rd(magic, 4);
  if (std::memcmp(magic, "OPDG", 4) != 0) OPDLM_FAIL_AT(path, "magic", "not a golden file");
  uint32_t version = 0, count = 0;
  rd(&version, 4);
  rd(&count, 4);
  if (version != 1) OPDLM_FAIL_AT(path, "version", "unsupported golden version ", version);
  Golden g;
  for (uint32_t e = 0; e < count; ++e) {
    uint32_t nlen = 0;
    rd(&nlen, 4);
    std::string name(nlen, '\0');
    rd(name.data(), nlen);
    uint8_t dt = 0;
    rd(&dt, 1);
    uint32_t ndim = 0;
    rd(&ndim, 4);
    Shape shape(ndim);
    for (uint32_t i = 0; i < ndim; ++i) rd(&shape[i], 8);
    DType dtype = dt == 0 ? DType::f32 : dt == 1 ? DType::f64 : dt == 3 ? DType::i32 : DType::bf16;
    if (dtype == DType::bf16) OPDLM_FAIL_AT(path, name, "unsupported dtype code ", int(dt));
    Tensor t = Tensor::empty(shape, dtype);
    rd(t.raw_data(), t.nbytes());
    g.emplace(name, std::move(t));
  }
  return g;
}

const Tensor& golden_get(const Golden& g, const std::string& name) {
  auto it = g.find(name);
  if (it == g.end()) OPDLM_FAIL("golden entry '", name, "' not found");
  return it->second;
}

model::Qwen3Config tiny_qwen3_config(int64_t vocab, int64_t hidden, int64_t intermediate, int64_t heads,
                                     int64_t kv_heads, int64_t head_dim, int64_t layers) {
  model::Qwen3Config c;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  return c;
}

std::string tiny_bpe_tokenizer_json(const std::vector<std::pair<int, std::string>>& special_tokens) {
  nlohmann::ordered_json vocab;
  for (int b = 0; b < 256; ++b) vocab[io::byte_level_char(static_cast<uint8_t>(b))] = b;
  const std::string sp = io::byte_level_char(' ');
  vocab["th"] = 256;
  vocab[sp + "w"] = 257;
  nlohmann::json added = nlohmann::json::array();
  for (const auto& [id, content] : special_tokens)
    added.push_back({{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  const nlohmann::json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                                     {"use_regex", true}};
  nlohmann::json decoder = byte_level;
  decoder["add_prefix_space"] = true;
  const nlohmann::json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor", nullptr},
      {"decoder", decoder},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", nlohmann::json::parse(vocab.dump())}, {"merges", {"t h", sp + " w"}}}}};
  return j.dump();
}

// ---- a tiny conversion setup ----


TinyOpdSetup make_tiny_opd_setup(const std::string& name, bool create, int64_t kv_heads) {
  namespace fs = std::filesystem;
  TinyOpdSetup s;
  s.dir = ::testing::TempDir() + "/opdlm_opd_" + name;
  s.tokenizer = s.dir + "/tokenizer.json";
  s.teacher = s.dir + "/teacher.h5";
  s.prompts = s.dir + "/prompts.jsonl";
  s.probe = s.dir + "/probe.jsonl";
  if (!create) return s;
  fs::remove_all(s.dir);
  fs::create_directories(s.dir);
  io::BpeTrainerOptions bo;
  bo.vocab_size = 260;
  bo.min_frequency = 1000000;
  io::BpeTrainer bt(bo);
  bt.add_text("0123456789+=");
  const io::Tokenizer tok = bt.train();
  tok.save(s.tokenizer);
  model::Qwen3Config c = tiny_qwen3_config(260, 32, 64, 4, kv_heads, 8);
  c.eos_token_id = tok.token_id("<|endoftext|>").value();
  c.pad_token_id = c.eos_token_id;
  c.mask_token_id = tok.token_id("<|MASK|>").value();
  model::Qwen3Weights w(c);
  w.init_random(5, 0.3);
  io::save_model(s.teacher, w);
  std::ofstream p(s.prompts);
  for (int i = 0; i < 7; ++i)
    p << nlohmann::json{{"id", i}, {"prompt", std::to_string(i) + "+" + std::to_string(2 * i) + "="}, {"response", std::to_string(3 * i)}}.dump() << "\n";
  p << nlohmann::json{{"id", "empty"}, {"prompt", ""}, {"response", "0"}}.dump() << "\n";          // skipped per sample
  p << nlohmann::json{{"id", "long"}, {"prompt", std::string(40, '7')}, {"response", "0"}}.dump() << "\n";  // > max_prompt_tokens
  p.close();
  std::ofstream q(s.probe);
  for (int i = 0; i < 3; ++i) q << nlohmann::json{{"id", i}, {"prompt", std::to_string(40 + i) + "+1="}}.dump() << "\n";
  return s;
}

train::OpdTrainOptions tiny_opd_options(const TinyOpdSetup& s, train::ConversionMode mode, const std::string& out) {
  train::OpdTrainOptions o;
  o.mode = mode;
  o.teacher = s.teacher;
  o.tokenizer = s.tokenizer;
  o.prompts = s.prompts;
  o.prompts_per_step = 4;
  o.rows_per_update = 2;
  o.max_prompt_tokens = 16;
  o.sampler.max_new_tokens = 8;
  o.loss.objective = mode == train::ConversionMode::rm_ce ? train::RowObjective::masked_ce : train::RowObjective::teacher_kl;
  o.rl_steps = 3;
  o.schedule = {1e-2, 1, 6, 0.1};
  o.probe_prompts = s.probe;
  o.out_dir = s.dir + "/" + out;
  o.seed = 77;
  return o;
}

std::vector<nlohmann::json> read_metrics_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}


}  // namespace opdlm::test
