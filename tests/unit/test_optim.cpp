// Tests for the optimizer ops: AdamW against a scalar transcription of torch.optim.AdamW, and the
// global grad norm / clipping (torch.nn.utils.clip_grad_norm_ rules, determinism, non-finite norms).
#include <gtest/gtest.h>

#include <array>

#include <algorithm>

#include <random>
#include <omp.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::ops;
using opdlm::test::max_rel_err;
using opdlm::test::random_tensor;

namespace {


// torch/optim/adamw.py (_single_tensor_adamw, amsgrad off), one element, line by line.
void torch_adamw_scalar(double& p, double g, double& m, double& v, int64_t step, const AdamWConfig& c) {
  p *= 1 - c.lr * c.weight_decay;
  m += (g - m) * (1 - c.beta1);  // exp_avg.lerp_(grad, 1 - beta1)
  v = v * c.beta2 + (1 - c.beta2) * g * g;
  const double bc1 = 1 - std::pow(c.beta1, double(step));
  const double bc2 = 1 - std::pow(c.beta2, double(step));
  const double denom = std::sqrt(v) / std::sqrt(bc2) + c.eps;
  p += -(c.lr / bc1) * m / denom;
}

}  // namespace

// ---- AdamW ---------------------------------------------------------------------------------------

TEST(AdamW, MatchesTorchFormulaOverSteps) {
  AdamWConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  Tensor p = random_tensor({3, 5}, 51, -1, 1), m({3, 5}, DType::f64), v({3, 5}, DType::f64);
  std::vector<double> rp = p.to_f64_vector(), rm(15, 0.0), rv(15, 0.0);
  for (int64_t step = 1; step <= 6; ++step) {
    Tensor g = random_tensor({3, 5}, 60 + static_cast<uint32_t>(step), -2, 2);
    if (step == 3) g.zero();  // a zero gradient still decays and moves by the momentum
    adamw_step(p, g, m, v, step, c);
    for (int i = 0; i < 15; ++i) torch_adamw_scalar(rp[i], g.item(i), rm[i], rv[i], step, c);
  }
  for (int i = 0; i < 15; ++i) {
    EXPECT_NEAR(p.item(i), rp[i], 1e-15);
    EXPECT_NEAR(m.item(i), rm[i], 1e-15);
    EXPECT_NEAR(v.item(i), rv[i], 1e-15);
  }
}

TEST(AdamW, FirstStepMovesByLrTimesSign) {
  // Bias correction makes step 1 (zero moments, no decay) move each weight by lr * g / (|g| + eps).
  AdamWConfig c;
  c.lr = 1e-3;
  Tensor p = random_tensor({64}, 52, -1, 1), p0 = p.clone();
  Tensor g = random_tensor({64}, 53, -1, 1), m({64}, DType::f64), v({64}, DType::f64);
  adamw_step(p, g, m, v, 1, c);
  for (int i = 0; i < 64; ++i) {
    const double gi = g.item(i);
    EXPECT_NEAR(p.item(i) - p0.item(i), -c.lr * gi / (std::fabs(gi) + c.eps), 1e-16);
  }
}

TEST(AdamW, F32TracksF64) {
  AdamWConfig c;
  c.lr = 1e-3;
  c.weight_decay = 0.1;
  Tensor p = random_tensor({257}, 54, -1, 1), m({257}, DType::f64), v({257}, DType::f64);
  Tensor p32 = p.to(DType::f32), m32({257}), v32({257});
  for (int64_t step = 1; step <= 5; ++step) {
    Tensor g = random_tensor({257}, 70 + static_cast<uint32_t>(step), -1, 1, DType::f32);
    adamw_step(p, g.to(DType::f64), m, v, step, c);
    adamw_step(p32, g, m32, v32, step, c);
  }
  EXPECT_LE(max_rel_err(p32, p), 1e-6);
  EXPECT_LE(max_rel_err(m32, m), 1e-6);
  EXPECT_LE(max_rel_err(v32, v), 1e-6);
}

TEST(AdamW, BadInputs) {
  AdamWConfig c;
  Tensor p({2, 5}), g({2, 5}), m({2, 5}), v({2, 5});
  EXPECT_ERROR_HAS(adamw_step(p, g, m, v, 0, c), "'step' is 0", ">= 1");
  EXPECT_ERROR_HAS(adamw_step(p, g, m, v, -3, c), "'step' is -3");
  Tensor g4({2, 4});
  EXPECT_ERROR_HAS(adamw_step(p, g4, m, v, 1, c), "'grad'", "dimension 1 is 4, expected 5");
  Tensor m1({10});
  EXPECT_ERROR_HAS(adamw_step(p, g, m1, v, 1, c), "'m'", "1 dimensions, expected 2");
  Tensor vd({2, 5}, DType::f64);
  EXPECT_ERROR_HAS(adamw_step(p, g, m, vd, 1, c), "'v'", "dtype of 'param'");
  Tensor vb({2, 5}, DType::bf16);
  EXPECT_ERROR_HAS(adamw_step(p, g, m, vb, 1, c), "'v'", "unsupported dtype bf16");
  Tensor pi({2, 5}, DType::i32);
  EXPECT_ERROR_HAS(adamw_step(pi, g, m, v, 1, c), "'param'", "unsupported dtype i32");
  auto bad = [&](auto set, const char* what) {
    AdamWConfig b;
    set(b);
    EXPECT_ERROR_HAS(adamw_step(p, g, m, v, 1, b), what);
  };
  bad([](AdamWConfig& b) { b.lr = -1; }, "'lr' is -1");
  bad([](AdamWConfig& b) { b.lr = NAN; }, "'lr'");
  bad([](AdamWConfig& b) { b.beta1 = 1.0; }, "'beta1' is 1");
  bad([](AdamWConfig& b) { b.beta2 = -0.1; }, "'beta2'");
  bad([](AdamWConfig& b) { b.eps = -1e-8; }, "'eps'");
  bad([](AdamWConfig& b) { b.weight_decay = -0.1; }, "'weight_decay'");
}

// ---- grad norm / clipping ------------------------------------------------------------------------

TEST(ExactSquareSum, TheSumIsExactAndTheSameInEveryOrderAndSplit) {
  // 2^30 squared is 2^60, whose f64 ulp is 256: a left fold drops every 1 that follows it.
  std::vector<float> xs = {std::ldexp(1.0f, 30)};
  for (int i = 0; i < 1024; ++i) xs.push_back(1.0f);
  ExactSquareSum a;
  a.add(std::span<const float>(xs));
  EXPECT_EQ(a.value(), std::ldexp(1.0, 60) + 1024.0);
  double fold = 0;
  for (float x : xs) fold += double(x) * double(x);
  EXPECT_EQ(fold, std::ldexp(1.0, 60)) << "the case must defeat an f64 left fold";
  // Random values of every magnitude (subnormals to 1e19), shuffled and split over "ranks" whose
  // lanes are added lane by lane: the same bits every time.
  std::mt19937 rng(7);
  std::vector<float> v;
  for (int i = 0; i < 5000; ++i)
    v.push_back(std::ldexp(std::uniform_real_distribution<float>(-1, 1)(rng), std::uniform_int_distribution<int>(-149, 64)(rng)));
  v.push_back(0.0f);
  v.push_back(-0.0f);
  ExactSquareSum whole;
  whole.add(std::span<const float>(v));
  const double ref = whole.value();
  long double check = 0;  // an independent, nearly exact value
  std::vector<long double> sq;
  for (float x : v) sq.push_back((long double)x * x);
  std::sort(sq.begin(), sq.end());
  for (long double q : sq) check += q;
  EXPECT_NEAR(ref, double(check), double(check) * 1e-15);
  for (int trial = 0; trial < 5; ++trial) {
    std::shuffle(v.begin(), v.end(), rng);
    std::array<int64_t, ExactSquareSum::kLanes> sum{};
    const size_t cut1 = v.size() / 3 + size_t(trial), cut2 = v.size() / 2 + size_t(7 * trial);
    for (auto [b, e] : {std::pair{size_t(0), cut1}, std::pair{cut1, cut2}, std::pair{cut2, v.size()}}) {
      ExactSquareSum part;
      part.add(std::span<const float>(v.data() + b, e - b));
      const auto l = part.lanes();
      for (size_t k = 0; k < l.size(); ++k) sum[k] += l[k];
    }
    EXPECT_EQ(ExactSquareSum::value(sum), ref) << "trial " << trial;
  }
  ExactSquareSum bad;
  bad.add(1.0f);
  bad.add(std::numeric_limits<float>::infinity());
  EXPECT_EQ(bad.value(), std::numeric_limits<double>::infinity());
  bad.add(std::nanf(""));
  EXPECT_TRUE(std::isnan(bad.value()));
  EXPECT_EQ(ExactSquareSum().value(), 0.0);
}

TEST(GradNorm, SumOfSquaresAndNorm) {
  Tensor a = Tensor::from_vector(std::vector<float>{3, 0}, {2});
  Tensor b = Tensor::from_vector(std::vector<double>{0, -4, 0}, {1, 3});
  EXPECT_EQ(grad_sq_sum({&a, &b}), 25.0);
  EXPECT_EQ(global_grad_norm({&a, &b}), 5.0);
  EXPECT_EQ(global_grad_norm({}), 0.0);
  // f32 values are squared in double: no f32 overflow for large gradients.
  Tensor big = Tensor::from_vector(std::vector<float>{3e20f, 4e20f}, {2});
  EXPECT_NEAR(global_grad_norm({&big}), 5e20, 1e-6 * 5e20);
}

TEST(GradNorm, ClipScalesLikeTorch) {
  Tensor a = Tensor::from_vector(std::vector<float>{3, 0}, {2});
  Tensor b = Tensor::from_vector(std::vector<double>{0, -4, 0}, {1, 3});
  const double norm = clip_grad_norm({&a, &b}, 1.0);
  EXPECT_EQ(norm, 5.0);
  const double c = 1.0 / (5.0 + 1e-6);
  EXPECT_EQ(a.item(0), double(float(3.0 * c)));
  EXPECT_EQ(b.item(1), -4.0 * c);
  // Below the threshold nothing changes (bitwise).
  Tensor d = random_tensor({10}, 81, -0.1, 0.1), d0 = d.clone();
  const double n2 = clip_grad_norm({&d}, 1.0);
  EXPECT_LT(n2, 1.0);
  EXPECT_EQ(opdlm::test::max_abs_err(d, d0), 0.0);
  EXPECT_EQ(clip_coefficient(0.5, 1.0), 1.0);
  EXPECT_EQ(clip_coefficient(2.0, 1.0), 1.0 / (2.0 + 1e-6));
}

TEST(GradNorm, NonFiniteNormIsReturnedAndNothingScaled) {
  for (double bad : {std::numeric_limits<double>::infinity(), double(NAN)}) {
    Tensor a = random_tensor({6}, 82, -5, 5), a0 = a.clone();
    Tensor b = Tensor::from_vector(std::vector<float>{1, float(bad), 2}, {3});
    const double n = clip_grad_norm({&a, &b}, 1.0);
    EXPECT_FALSE(std::isfinite(n));
    EXPECT_EQ(std::isnan(n), std::isnan(bad));
    EXPECT_EQ(opdlm::test::max_abs_err(a, a0), 0.0);
    EXPECT_EQ(b.item(0), 1.0);
  }
}

TEST(GradNorm, SameBitsForAnyThreadCount) {
  Tensor a = random_tensor({200003}, 83, -1, 1, DType::f32), b = random_tensor({70001}, 84, -1, 1);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double s1 = grad_sq_sum({&a, &b});
  omp_set_num_threads(2);
  const double s2 = grad_sq_sum({&a, &b});
  omp_set_num_threads(3);
  const double s3 = grad_sq_sum({&a, &b});
  omp_set_num_threads(saved);
  EXPECT_EQ(s1, s2);
  EXPECT_EQ(s1, s3);
}

TEST(GradNorm, BadInputs) {
  Tensor a({3}), bb({3}, DType::bf16);
  EXPECT_ERROR_HAS(grad_sq_sum({&a, nullptr}), "'grads[1]'", "null");
  EXPECT_ERROR_HAS(grad_sq_sum({&bb}), "'grads[0]'", "unsupported dtype bf16");
  Tensor ii({3}, DType::i32);
  EXPECT_ERROR_HAS(clip_grad_norm({&a, &ii}, 1.0), "'grads[1]'", "unsupported dtype i32");
  EXPECT_ERROR_HAS(clip_grad_norm({&a}, 0.0), "'max_norm' is 0", "> 0");
  EXPECT_ERROR_HAS(clip_grad_norm({&a}, -1.0), "'max_norm'");
}
