// GPU parity of the sampler (ops/cuda/sampling_cuda.hpp): the device Philox stream against CounterRng,
// and cuda::sample_tokens against ops::sample_token row by row (tokens exactly, confidences to 1e-6
// relative) over greedy / temperature / top-k / top-p / combined params, with and without tied logits,
// f32 and bf16, V in {7, 1000, 151936}.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu_test_util.hpp"
#include "opdlm/base/rng.hpp"
#include "opdlm/ops/cuda/sampling_cuda.hpp"
#include "opdlm/ops/sampling.hpp"
#include "test_util.hpp"

// Test-only hooks defined in src/ops/cuda/sampling.cu.
namespace opdlm::cuda::testing {
void philox_words(const DeviceRngKey& key, const uint32_t* idx, int64_t n, uint32_t* out, cudaStream_t stream);
void gumbel_values(const DeviceRngKey& key, const uint32_t* idx, int64_t n, double* out, cudaStream_t stream);
}  // namespace opdlm::cuda::testing

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;

// ---- helpers -------------------------------------------------------------------------------------------
template <class T>
DeviceBuffer upload_vec(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  if (!v.empty()) CUDA_CHECK(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}
template <class T>
std::vector<T> download_vec(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  CUDA_CHECK(cudaDeviceSynchronize());
  if (n) CUDA_CHECK(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

std::vector<RngKey> test_keys() {
  return {RngKey{0, RngPurpose::test, 0, 0, 0}, RngKey{1234, RngPurpose::rollout_token, 7, 3, 99},
          RngKey{0xffffffffu, RngPurpose::data_generate, 0xfffffffeu, 0x80000000u, 0x7fffffffu}};
}

std::vector<uint32_t> test_indices() {
  std::vector<uint32_t> idx;
  for (uint32_t i = 0; i < 64; ++i) idx.push_back(i);
  for (uint32_t i : {1000u, 151935u, 303871u, 0x7fffffffu, 0x80000000u, 0xfffffffcu, 0xffffffffu}) idx.push_back(i);
  return idx;
}

// ---- the device stream -----------------------------------------------------------------------------------
TEST(SamplingCuda, PhiloxWordsMatchCounterRng) {
  const auto idx = test_indices();
  auto d_idx = upload_vec(idx);
  DeviceBuffer d_out(idx.size() * sizeof(uint32_t));
  int64_t bad = 0;
  for (const RngKey& k : test_keys()) {
    cuda::testing::philox_words(cuda::to_device_key(k), d_idx.as<uint32_t>(), int64_t(idx.size()),
                                d_out.as<uint32_t>(), nullptr);
    const auto got = download_vec<uint32_t>(d_out, idx.size());
    const CounterRng rng(k);
    for (size_t i = 0; i < idx.size(); ++i) {
      const uint32_t want = rng.u32(idx[i]);
      if (got[i] != want && bad++ < 10)
        ADD_FAILURE() << "seed " << k.seed << " index " << idx[i] << ": device " << got[i] << ", CPU " << want;
    }
  }
  EXPECT_EQ(bad, 0);
  std::printf("PARITY %-28s %-5s %-24s mismatched words %lld\n", "philox4x32_10.u32", "u32", "3 keys x 71",
              static_cast<long long>(bad));
}

TEST(SamplingCuda, GumbelMatchesCounterRng) {
  std::vector<uint32_t> idx;
  for (uint32_t i = 0; i < 4096; ++i) idx.push_back(i * 37u);
  auto d_idx = upload_vec(idx);
  DeviceBuffer d_out(idx.size() * sizeof(double));
  int64_t exact = 0, total = 0;
  double worst = 0;
  for (const RngKey& k : test_keys()) {
    cuda::testing::gumbel_values(cuda::to_device_key(k), d_idx.as<uint32_t>(), int64_t(idx.size()),
                                 d_out.as<double>(), nullptr);
    const auto got = download_vec<double>(d_out, idx.size());
    const CounterRng rng(k);
    for (size_t i = 0; i < idx.size(); ++i) {
      const double want = rng.gumbel(idx[i]);
      ++total;
      if (got[i] == want) ++exact;
      worst = std::max(worst, std::fabs(got[i] - want) / std::max(std::fabs(want), 1e-3));
    }
  }
  // CUDA's double log is within 1 ulp, glibc's nearly correctly rounded: a few ulp at most.
  std::printf("PARITY %-28s %-5s %-24s bit-exact %lld / %lld, max_rel %.3e\n", "gumbel", "f64", "3 keys x 4096",
              static_cast<long long>(exact), static_cast<long long>(total), worst);
  EXPECT_LE(worst, 1e-14);
}

// ---- sample_tokens against sample_token ------------------------------------------------------------------
struct Variant {
  std::string name;
  ops::SamplingParams p;
};

ops::SamplingParams make(double t, int64_t k, double top_p) {
  ops::SamplingParams p;
  p.temperature = t;
  p.top_k = k;
  p.top_p = top_p;
  return p;
}

std::vector<Variant> variants() {
  return {{"greedy", make(0, 0, 1)},          {"t1", make(1, 0, 1)},
          {"t0.7", make(0.7, 0, 1)},          {"topk1", make(1, 1, 1)},
          {"topk5", make(1, 5, 1)},           {"topk50", make(1, 50, 1)},
          {"topp0.9", make(1, 0, 0.9)},       {"topp0.5", make(1, 0, 0.5)},
          {"t0.7_topk50_topp0.9", make(0.7, 50, 0.9)}};
}

// Logits [rows, V] (f32, already rounded to bf16 for dt == bf16). `tied`: values on a 0.5 grid in
// [-8, 8] (many exact ties, including at the maximum), and in some rows a block of copies of the max.
Tensor make_logits(int64_t rows, int64_t V, uint32_t seed, bool tied, DType dt) {
  Tensor t = test::random_tensor({rows, V}, seed, -8.0, 8.0, DType::f32);
  float* p = t.data<float>();
  if (tied) {
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = std::round(p[i] * 2.0f) * 0.5f;
    for (int64_t r = 0; r < rows; r += 3) {
      float* row = p + r * V;
      float mx = row[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
      for (int64_t v = V / 3; v < std::min<int64_t>(V, V / 3 + 5); ++v) row[v] = mx;
    }
  }
  return dt == DType::bf16 ? gpu_test::round_bf16(t) : t;
}

std::vector<RngKey> row_keys(int64_t rows, uint32_t seed) {
  const CounterRng rng(RngKey{seed, RngPurpose::test, 11, 0, 0});
  std::vector<RngKey> keys(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t i = static_cast<uint32_t>(4 * r);
    keys[size_t(r)] = RngKey{rng.u32(i), RngPurpose::rollout_token, rng.u32(i + 1), rng.u32(i + 2), rng.u32(i + 3)};
  }
  return keys;
}

// Runs one (variant, V, rows, ties, dtype) case; returns the number of rows whose token differs.
int64_t check_case(const Variant& var, int64_t rows, int64_t V, bool tied, DType dt, uint32_t seed) {
  const Tensor logits = make_logits(rows, V, seed, tied, dt);
  const auto keys = row_keys(rows, seed);
  // CPU reference.
  std::vector<float> scratch(static_cast<size_t>(V));
  std::vector<int32_t> want_tok(static_cast<size_t>(rows));
  std::vector<double> want_conf(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const auto d = ops::sample_token(logits.data<float>() + r * V, V, var.p, CounterRng(keys[size_t(r)]), scratch.data());
    want_tok[size_t(r)] = d.token;
    want_conf[size_t(r)] = d.confidence;
  }
  // GPU.
  auto d_logits = gpu_test::upload(logits, dt);
  std::vector<cuda::DeviceRngKey> dkeys;
  for (const auto& k : keys) dkeys.push_back(cuda::to_device_key(k));
  auto d_keys = upload_vec(dkeys);
  DeviceBuffer d_tok(size_t(rows) * sizeof(int32_t)), d_conf(size_t(rows) * sizeof(float));
  DeviceBuffer d_scratch(std::max<size_t>(cuda::sample_scratch_bytes(rows, V, var.p), 1));
  cuda::sample_tokens(d_logits.get(), rows, V, var.p, d_keys.as<cuda::DeviceRngKey>(), d_tok.as<int32_t>(),
                      d_conf.as<float>(), d_scratch.get(), dt, nullptr);
  const auto got_tok = download_vec<int32_t>(d_tok, size_t(rows));
  const auto got_conf = download_vec<float>(d_conf, size_t(rows));

  const std::string shape = std::to_string(rows) + "x" + std::to_string(V) + (tied ? " tied" : "");
  int64_t bad = 0;
  std::vector<double> gt(static_cast<size_t>(rows)), wt(static_cast<size_t>(rows)), gc(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const size_t i = size_t(r);
    gt[i] = got_tok[i], wt[i] = want_tok[i], gc[i] = got_conf[i];
    if (got_tok[i] != want_tok[i]) {
      if (bad++ < 3) {
        // Diagnose: the CPU's filtered values and perturbed scores of both tokens.
        std::vector<float> out(static_cast<size_t>(V));
        ops::filter_logits(logits.data<float>() + r * V, V, var.p, out.data());
        const CounterRng rng(keys[i]);
        auto score = [&](int32_t v) {
          return v >= 0 && v < V ? double(out[size_t(v)]) + rng.gumbel(uint32_t(v)) : NAN;
        };
        const int32_t a = want_tok[i], b = got_tok[i];
        ADD_FAILURE() << var.name << " " << dtype_name(dt) << " " << shape << " row " << r << ": CPU token " << a
                      << " (filtered " << out[size_t(a)] << ", score " << score(a) << "), GPU token " << b
                      << " (filtered " << (b >= 0 && b < V ? out[size_t(b)] : NAN) << ", score " << score(b) << ")";
      }
    } else if (!(std::fabs(double(got_conf[i]) - want_conf[i]) <= 1e-6 * std::fabs(want_conf[i]) + 1e-30)) {
      ADD_FAILURE() << var.name << " " << shape << " row " << r << ": confidence " << got_conf[i] << " vs CPU "
                    << want_conf[i];
    }
  }
  EXPECT_PARITY("sample." + var.name + ".token", dt, shape, Tensor::from_vector(gt, {rows}),
                Tensor::from_vector(wt, {rows}), 0.0, 0.0);
  EXPECT_PARITY("sample." + var.name + ".conf", dt, shape, Tensor::from_vector(gc, {rows}),
                Tensor::from_vector(want_conf, {rows}), 0.0, 1e-6);
  return bad;
}

void check_all(DType dt) {
  int64_t rows_checked = 0, bad = 0;
  uint32_t seed = dt == DType::bf16 ? 500 : 100;
  for (const Variant& var : variants()) {
    for (bool tied : {false, true}) {
      for (auto [V, rows] : {std::pair<int64_t, int64_t>{7, 40}, {1000, 40}, {151936, 3}}) {
        bad += check_case(var, rows, V, tied, dt, ++seed);
        rows_checked += rows;
      }
    }
  }
  std::printf("sample_tokens %s: %lld rows, %lld token mismatches\n", dtype_name(dt),
              static_cast<long long>(rows_checked), static_cast<long long>(bad));
  EXPECT_EQ(bad, 0);
}

TEST(SamplingCuda, TokensMatchCpuF32) { check_all(DType::f32); }
TEST(SamplingCuda, TokensMatchCpuBf16) { check_all(DType::bf16); }

// Near the real shape: a decode step of 16 rows over the Qwen3 vocabulary with the rollout params.
TEST(SamplingCuda, RolloutShape) {
  const Variant var{"rollout_t1", make(1, 0, 1)};
  EXPECT_EQ(check_case(var, 16, 151936, false, DType::bf16, 900), 0);
  const Variant var2{"rollout_topk50_topp0.9", make(1, 50, 0.9)};
  EXPECT_EQ(check_case(var2, 16, 151936, false, DType::f32, 901), 0);
}

// Edge cases: -inf logits (masked vocabulary), all-but-one masked, zero rows, a bad dtype.
TEST(SamplingCuda, EdgeCases) {
  const int64_t rows = 12, V = 300;
  Tensor logits = make_logits(rows, V, 77, false, DType::f32);
  float* p = logits.data<float>();
  for (int64_t v = 0; v < V; v += 2) p[v] = -INFINITY;            // row 0: half masked
  for (int64_t v = 0; v < V; ++v) if (v != 123) p[V + v] = -INFINITY;  // row 1: one survivor
  const auto keys = row_keys(rows, 77);
  std::vector<cuda::DeviceRngKey> dkeys;
  for (const auto& k : keys) dkeys.push_back(cuda::to_device_key(k));
  auto d_keys = upload_vec(dkeys);
  auto d_logits = gpu_test::upload(logits, DType::f32);
  DeviceBuffer d_tok(rows * sizeof(int32_t)), d_conf(rows * sizeof(float));
  std::vector<float> scratch(V);
  for (const Variant& var : variants()) {
    cuda::sample_tokens(d_logits.get(), rows, V, var.p, d_keys.as<cuda::DeviceRngKey>(), d_tok.as<int32_t>(),
                        d_conf.as<float>(), nullptr, DType::f32, nullptr);
    const auto got = download_vec<int32_t>(d_tok, rows);
    for (int64_t r = 0; r < rows; ++r) {
      const auto d = ops::sample_token(p + r * V, V, var.p, CounterRng(keys[size_t(r)]), scratch.data());
      EXPECT_EQ(got[size_t(r)], d.token) << var.name << " row " << r;
    }
  }
  // Zero rows: nothing launched, nothing touched.
  cuda::sample_tokens(d_logits.get(), 0, V, make(1, 0, 1), d_keys.as<cuda::DeviceRngKey>(), d_tok.as<int32_t>(),
                      d_conf.as<float>(), nullptr, DType::f32, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string err = test::error_of([&] {
    cuda::sample_tokens(d_logits.get(), rows, V, make(1, 0, 1), d_keys.as<cuda::DeviceRngKey>(),
                        d_tok.as<int32_t>(), d_conf.as<float>(), nullptr, DType::i32, nullptr);
  });
  EXPECT_NE(err.find("sample_tokens"), std::string::npos) << err;
  EXPECT_NE(err.find("i32"), std::string::npos) << err;
}

}  // namespace
}  // namespace opdlm
