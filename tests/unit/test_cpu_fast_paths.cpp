// Tests for the CPU fast paths added for decoding and training speed (docs/performance.md): the
// small-row product against a double reference and OpenBLAS, bit-identical for any thread count;
// vectorised SwiGLU and cross-entropy on sizes that cover every loop tail and the threaded branch;
// the host block cache; draw_token; and thread-count invariance of both decoders, whose per-row draws
// now run on OpenMP threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/model/ar_generate.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/matmul.hpp"
#include "opdlm/ops/sampling.hpp"
#include "opdlm/ops/swiglu.hpp"
#include "test_util.hpp"
#include "../../src/ops/cpu/simd_avx2.hpp"  // internal: the vectorised exps

using namespace opdlm;

namespace {

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.numel() == b.numel() &&
         std::memcmp(a.raw_data(), b.raw_data(), static_cast<size_t>(a.nbytes())) == 0;
}

// Restores the OpenMP thread count on scope exit.
struct ThreadCount {
  int saved = omp_get_max_threads();
  ~ThreadCount() { omp_set_num_threads(saved); }
};

}  // namespace

// ==== small-row products (x @ w^T with few rows) =====================================================
TEST(SmallRowMatmul, MatchesDoubleReferenceOnEveryTail) {
  // Rows: the few-row kernel (1..8), around the 2-row step and the 32-row limit; columns around the
  // 4-column panels; inner sizes around the 8-lane vectors (1, 7: mask-only loads) and the few-row
  // kernel's k limit (600: rows <= 8 take the 2 x 4 kernel).
  for (int64_t m : {1, 2, 3, 5, 7, 8, 9, 31, 32, 33})
    for (int64_t n : {1, 3, 4, 5, 17, 130})
      for (int64_t k : {1, 7, 8, 9, 33, 128, 600}) {
        const Tensor a = test::random_tensor({m, k}, uint32_t(m * 1000 + n * 10 + k), -1, 1, DType::f32);
        const Tensor b = test::random_tensor({n, k}, uint32_t(7 + m + n + k), -1, 1, DType::f32);
        const Tensor c = ops::matmul(a, false, b, true);
        const Tensor ref = ops::matmul(a.to(DType::f64), false, b.to(DType::f64), true);
        ASSERT_EQ(c.shape(), (Shape{m, n}));
        // f32 rounding of a k-term dot product of values in [-1, 1].
        EXPECT_LE(test::max_abs_err(c, ref), 4e-7 * double(k) + 1e-7) << m << "x" << n << "x" << k;
      }
}

TEST(SmallRowMatmul, SameBitsForAnyThreadCountAndAnyNumberOfRows) {
  ThreadCount restore;
  // 1002 columns: 250 full 4-column panels and a 2-column one. 24 rows take the 2 x 4 kernel, 1 and 8
  // rows the few-row kernel: a row's outputs must not depend on which kernel or how many rows.
  const Tensor x = test::random_tensor({24, 384}, 5, -1, 1, DType::f32);
  const Tensor w = test::random_tensor({1002, 384}, 6, -1, 1, DType::f32);
  omp_set_num_threads(1);
  const Tensor one = ops::linear_forward(x, w);
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    EXPECT_TRUE(same_bits(one, ops::linear_forward(x, w))) << threads << " threads";
  }
  const Tensor row5 = ops::linear_forward(x.slice(5, 6).clone(), w);
  EXPECT_EQ(std::memcmp(row5.raw_data(), one.data<float>() + 5 * 1002, 1002 * sizeof(float)), 0);
  const Tensor rows8 = ops::linear_forward(x.slice(8, 16).clone(), w);
  EXPECT_EQ(std::memcmp(rows8.raw_data(), one.data<float>() + 8 * 1002, 8 * 1002 * sizeof(float)), 0);
  EXPECT_LE(test::max_abs_err(one, ops::linear_forward(x.to(DType::f64), w.to(DType::f64))), 1e-4);
}

TEST(SmallRowMatmul, BatchedSharedWeightAndAccumulateKeepTheirMeaning) {
  // a [2, 3, 16] with a shared 2-D b takes the small-row path as 6 rows; beta = 1 does not.
  const Tensor a = test::random_tensor({2, 3, 16}, 8, -1, 1, DType::f32);
  const Tensor b = test::random_tensor({5, 16}, 9, -1, 1, DType::f32);
  const Tensor c = ops::matmul(a, false, b, true);
  ASSERT_EQ(c.shape(), (Shape{2, 3, 5}));
  const Tensor ref = ops::matmul(a.to(DType::f64), false, b.to(DType::f64), true);
  EXPECT_LE(test::max_abs_err(c, ref), 1e-5);
  const Tensor a2 = test::random_tensor({2, 16}, 10, -1, 1, DType::f32);
  Tensor acc = Tensor::full({2, 5}, 1.0, DType::f32);
  ops::matmul(a2, false, b, true, acc, 2.0, 1.0);
  const Tensor r2 = ops::matmul(a2.to(DType::f64), false, b.to(DType::f64), true);
  for (int64_t i = 0; i < 10; ++i) EXPECT_NEAR(acc.item(i), 1.0 + 2.0 * r2.item(i), 1e-5) << i;
}

// ==== SwiGLU and cross-entropy, vectorised f32 ========================================================
TEST(VectorisedElementwise, SwigluMatchesScalarFormulaAcrossChunksAndThreads) {
  // 40,003 elements: above the threading threshold, several 4096-element chunks, a 3-lane tail.
  const int64_t n = 40003;
  Tensor g = test::random_tensor({1, n}, 11, -30, 30, DType::f32), u = test::random_tensor({1, n}, 12, -1, 1, DType::f32);
  const Tensor dh = test::random_tensor({1, n}, 13, -1, 1, DType::f32);
  const Tensor h = ops::swiglu_forward(g, u);
  Tensor dg, du;
  ops::swiglu_backward(g, u, dh, &dg, &du);
  double worst_h = 0, worst_g = 0, worst_u = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double gv = g.item(i), uv = u.item(i), d = dh.item(i), s = 1 / (1 + std::exp(-gv));
    worst_h = std::max(worst_h, std::fabs(h.item(i) - gv * s * uv) / (1 + std::fabs(gv * s * uv)));
    worst_g = std::max(worst_g, std::fabs(dg.item(i) - d * uv * (s + gv * s * (1 - s))));
    worst_u = std::max(worst_u, std::fabs(du.item(i) - d * gv * s) / (1 + std::fabs(d * gv * s)));
  }
  EXPECT_LE(worst_h, 1e-6);
  EXPECT_LE(worst_g, 1e-6);
  EXPECT_LE(worst_u, 1e-6);
  // In place (dg aliasing gate, du aliasing up) gives the same values.
  Tensor g2 = g.clone(), u2 = u.clone();
  ops::swiglu_backward(g2, u2, dh, &g2, &u2);
  EXPECT_TRUE(same_bits(g2, dg));
  EXPECT_TRUE(same_bits(u2, du));
}

TEST(VectorisedElementwise, CrossEntropyMatchesDoubleOnLargeVocabulary) {
  // V = 4099: two 2048-term partial sums and a 3-lane tail; logits wide enough to exercise the shift.
  const int64_t n = 5, V = 4099;
  const Tensor logits = test::random_tensor({n, V}, 21, -20, 20, DType::f32);
  const Tensor targets = Tensor::from_vector(std::vector<int32_t>{0, 4098, 17, ops::kIgnoreIndex, 2048}, {n});
  Tensor lse;
  const Tensor loss = ops::cross_entropy_forward(logits, targets, Tensor(), &lse);
  const Tensor dloss = Tensor::full({n}, 0.5, DType::f32);
  const Tensor dz = ops::cross_entropy_backward(logits, targets, Tensor(), lse, dloss);
  Tensor lse64;
  const Tensor logits64 = logits.to(DType::f64);
  const Tensor loss64 = ops::cross_entropy_forward(logits64, targets, Tensor(), &lse64);
  const Tensor dz64 = ops::cross_entropy_backward(logits64, targets, Tensor(), lse64, dloss.to(DType::f64));
  EXPECT_LE(test::max_abs_err(lse, lse64), 2e-6 * 20);
  EXPECT_LE(test::max_abs_err(loss, loss64), 2e-6 * 40);
  EXPECT_LE(test::max_abs_err(dz, dz64), 1e-7);
  for (int64_t v = 0; v < V; ++v) ASSERT_EQ(dz.item(3 * V + v), 0.0) << "ignored row, column " << v;
  // The target column carries the -1 (times dloss): the one column computed apart from the vector pass.
  EXPECT_NEAR(dz.item(1 * V + 4098), dz64.item(1 * V + 4098), 1e-7);
  EXPECT_LT(dz.item(0), 0.0);
}

// ==== the vectorised exps ===========================================================================
#ifdef OPDLM_SIMD_X86
namespace {
OPDLM_AVX2 void exp4d(const double* in, double* out) {
  _mm256_storeu_pd(out, ops::simd::exp256d_nonpos(_mm256_loadu_pd(in)));
}
OPDLM_AVX2 void exp8f(const float* in, float* out) { _mm256_storeu_ps(out, ops::simd::exp256(_mm256_loadu_ps(in))); }
}  // namespace

TEST(VectorisedExp, FloatAndDoubleAgainstLibm) {
  if (!ops::simd::cpu_has_avx2_fma()) GTEST_SKIP() << "no AVX2+FMA on this CPU";
  double worst_f = 0, worst_d = 0;
  for (double x = -750.0; x <= 0.0; x += 0.0137) {
    double in[4] = {x, x * 0.5, x * 1e-3, x * 1e-9 - 1e-12}, out[4];
    exp4d(in, out);
    for (int i = 0; i < 4; ++i) {
      const double ref = in[i] < -708.0 ? 0.0 : std::exp(in[i]);
      if (ref == 0.0) ASSERT_EQ(out[i], 0.0) << in[i];
      else worst_d = std::max(worst_d, std::fabs(out[i] - ref) / ref);
    }
    if (x > -87.0) {
      float fin[8], fout[8];
      for (int i = 0; i < 8; ++i) fin[i] = static_cast<float>(x / (1 + i));
      exp8f(fin, fout);
      for (int i = 0; i < 8; ++i) {
        const double ref = std::exp(double(fin[i]));
        worst_f = std::max(worst_f, std::fabs(fout[i] - ref) / ref);
      }
    }
  }
  std::printf("[exp] worst relative error: double %.3g, float %.3g\n", worst_d, worst_f);
  EXPECT_LE(worst_d, 1e-15);  // a few ulp of double
  EXPECT_LE(worst_f, 3e-7);   // ~2 ulp of float
}
#endif

// ==== host block cache ==============================================================================
TEST(HostBlockCache, LargeBlocksAreReusedSmallOnesAndOverLimitAreNot) {
  host_cache_configure(size_t{64} << 20);
  const size_t big = size_t{3} << 20;  // bytes
  const void* first = nullptr;
  {
    Tensor t = Tensor::empty({int64_t(big / 4)}, DType::f32);
    first = t.raw_data();
  }
  HostCacheStats s0 = host_cache_stats();
  EXPECT_EQ(s0.cached_bytes, big);
  {
    Tensor t = Tensor::empty({int64_t(big / 4)}, DType::f32);  // same size: the cached block
    EXPECT_EQ(t.raw_data(), first);
    EXPECT_EQ(host_cache_stats().hits, s0.hits + 1);
    EXPECT_EQ(host_cache_stats().cached_bytes, 0u);
    Tensor z({int64_t(big / 4)}, DType::f32);  // a zero-filled tensor is zero even from a used block
    for (int64_t i = 0; i < z.numel(); i += 4099) ASSERT_EQ(z.item(i), 0.0);
  }
  {
    Tensor small = Tensor::empty({1000}, DType::f32);  // below the 1 MiB threshold: never cached
  }
  EXPECT_EQ(host_cache_stats().cached_bytes, 2 * big);
  // A limit below one block: nothing is kept, and configure() frees what was.
  host_cache_configure(big - 64);
  EXPECT_EQ(host_cache_stats().cached_bytes, 0u);
  { Tensor t = Tensor::empty({int64_t(big / 4)}, DType::f32); }
  EXPECT_EQ(host_cache_stats().cached_bytes, 0u);
  host_cache_configure(0);
  { Tensor t = Tensor::empty({int64_t(big / 4)}, DType::f32); }
  EXPECT_EQ(host_cache_stats().cached_bytes, 0u);
  EXPECT_EQ(host_cache_stats().limit_bytes, 0u);
  host_cache_configure(size_t{2} << 30);
}

// ==== sampling and the decoders on threads ===========================================================
TEST(DrawToken, IsSampleTokensToken) {
  const int64_t V = 301;
  const Tensor logits = test::random_tensor({V}, 31, -4, 4, DType::f32);
  std::vector<float> scratch(V);
  ops::SamplingParams ps[4];
  ps[0].temperature = 0;
  ps[1].temperature = 1;
  ps[2].temperature = 0.7;
  ps[2].top_k = 20;
  ps[3].temperature = 1.3;
  ps[3].top_p = 0.8;
  for (const auto& p : ps)
    for (uint32_t pos = 0; pos < 50; ++pos) {
      const CounterRng rng({3, RngPurpose::rollout_token, 1, 9, pos});
      EXPECT_EQ(ops::draw_token(logits.data<float>(), V, p, rng, scratch.data()),
                ops::sample_token(logits.data<float>(), V, p, rng, scratch.data()).token);
    }
}

TEST(DecodersOnThreads, SameTokensForAnyThreadCount) {
  ThreadCount restore;
  // V = 4099: enough rows x V for the draws to run on threads (they stay serial below 16k logits).
  model::Qwen3Config c = test::tiny_qwen3_config(4099, 32, 64, 4, 2, 8, 2);
  c.mask_token_id = 4098;
  model::Qwen3Weights w(c);
  w.init_random(4, 0.3);
  const model::Qwen3Model m = model::Qwen3Model::teacher(std::move(w));
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {4, 5, 6, 7, 8}, {9}, {10, 11}, {12, 13, 14, 15}};
  const std::vector<uint32_t> ids = {0, 1, 2, 3, 4};
  model::ArGenerateOptions ao;
  ao.max_new_tokens = 12;
  ao.sampling.temperature = 1.0;
  ao.seed = 5;
  diffusion::SamplerOptions bo;
  bo.block_size = 4;
  bo.steps_per_block = 2;
  bo.max_new_tokens = 12;
  bo.mask_id = 4098;
  bo.seed = 5;
  bo.sampling.temperature = 1.0;
  omp_set_num_threads(1);
  const auto ar1 = model::ar_generate(m, prompts, ids, ao);
  const auto bd1 = diffusion::bd_generate(m, prompts, ids, bo);
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const auto ar = model::ar_generate(m, prompts, ids, ao);
    const auto bd = diffusion::bd_generate(m, prompts, ids, bo);
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(ar[i].tokens, ar1[i].tokens) << "AR sequence " << i << ", " << threads << " threads";
      EXPECT_EQ(bd[i], bd1[i]) << "BD sequence " << i << ", " << threads << " threads";
    }
  }
}
