// Shared test helpers: deterministic random tensors, central-difference gradients, error metrics,
// and the golden-file reader for PyTorch parity cases.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include "opdlm/base/rng.hpp"
#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/tensor/tensor.hpp"
#include "opdlm/train/opd_trainer.hpp"
#include <nlohmann/json.hpp>

namespace opdlm::test {

// Uniform in [lo, hi), keyed by `seed` through the counter RNG (no std:: engines: same on every libc).
Tensor random_tensor(const Shape& shape, uint32_t seed, double lo = -1.0, double hi = 1.0,
                     DType dtype = DType::f64);
Tensor random_ids(const Shape& shape, uint32_t seed, int32_t vocab);

// d f / d x by central differences, perturbing each element of `x` (f64 or f32) in place.
Tensor numeric_grad(const std::function<double()>& f, Tensor& x, double eps = 1e-6);

// max_i |a_i - b_i| / max(max_i |b_i|, floor): a scale-aware relative error for whole tensors.
double max_rel_err(const Tensor& a, const Tensor& b, double floor = 1e-12);
double max_abs_err(const Tensor& a, const Tensor& b);
// sum_i a_i * b_i in f64 (projects a vector output onto a fixed random direction).
double dot(const Tensor& a, const Tensor& b);

// A fresh folder per test (named after the test and the pid), removed afterwards.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string operator/(const std::string& name) const { return file(name); }

 private:
  std::filesystem::path path_;
};

// A small Qwen3 config for model-level tests (2 layers unless given); ids such as eos/mask are left
// for the caller to set.
model::Qwen3Config tiny_qwen3_config(int64_t vocab, int64_t hidden, int64_t intermediate, int64_t heads,
                                     int64_t kv_heads, int64_t head_dim, int64_t layers = 2);

// tokenizer.json text of a real byte-level BPE: the 256 byte symbols (ids = bytes), the merges
// "t h" -> 256 and " w" -> 257, and the given special tokens {id, content}.
std::string tiny_bpe_tokenizer_json(const std::vector<std::pair<int, std::string>>& special_tokens);

// Runs f and returns the opdlm::Error text ("" when nothing was thrown).
std::string error_of(const std::function<void()>& f);

// The whole file as bytes ("" when it cannot be read).
std::string read_file_bytes(const std::string& path);

// Mask descriptors from a golden i32 tensor [n, 6]: kind (0 causal, 1 block_causal, 2 training),
// b, pad_left, prompt_len, response_len, q_offset (tests/golden/gen_attention.py writes them).
std::vector<ops::MaskDescriptor> mask_descriptors_from_golden(const Tensor& params);

// Records an error figure as a gtest property (shows in the XML report and with --gtest_output).
void record_error(const std::string& key, double err);

// Cases written by tests/golden/*.py: name -> tensor (f32, f64 or i32), one file per op group.
using Golden = std::map<std::string, Tensor>;
// Reads OPDLM_GOLDEN_DIR/<group>.bin (the ctest fixture `golden` generates them).
Golden load_golden(const std::string& group);
const Tensor& golden_get(const Golden& g, const std::string& name);
std::string golden_dir();

using parallel::LocalCommunicator;  // the library's one-process communicator

// A tiny conversion setup in TempDir()/opdlm_opd_<name>: a byte-level tokenizer (ids 0..255 bytes,
// 256 <|endoftext|>, ..., 259 <|MASK|>), a random 2-layer teacher (4 heads, `kv_heads` KV heads), 9 arithmetic prompts of which two
// are unusable (one empty, one longer than max_prompt_tokens) and 3 probe prompts. create = false
// only computes the paths (other MPI ranks of a test whose rank 0 wrote the files).
struct TinyOpdSetup {
  std::string dir, teacher, tokenizer, prompts, probe;
};
TinyOpdSetup make_tiny_opd_setup(const std::string& name, bool create = true, int64_t kv_heads = 2);
// Options for a 3-RL-step run of `mode` on it into s.dir/out (4 prompts per step, 2 rows per update).
train::OpdTrainOptions tiny_opd_options(const TinyOpdSetup& s, train::ConversionMode mode, const std::string& out);
// Every line of a metrics.jsonl.
std::vector<nlohmann::json> read_metrics_jsonl(const std::string& path);

}  // namespace opdlm::test

// The statement must throw an opdlm::Error whose text contains every given fragment.
#define EXPECT_ERROR_HAS(stmt, ...)                                                             \
  do {                                                                                          \
    const std::string msg_ = ::opdlm::test::error_of([&] { stmt; });                            \
    ASSERT_FALSE(msg_.empty()) << #stmt " did not throw";                                       \
    for (const char* part_ : {__VA_ARGS__})                                                     \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "'" << part_ << "' not in: " << msg_;   \
  } while (0)
