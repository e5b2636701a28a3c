// CPU attention tests: forward vs a dense f64 reference built from the literal mask rules, backward
// vs central finite differences (f64 and f32), KV-cache decode consistency, and bad-input messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <omp.h>

#include "opdlm/ops/attention.hpp"
#include "test_util.hpp"

using namespace opdlm;
using ops::MaskDescriptor;

namespace opdlm::test {
// Literal transcription of the mask rules (defined in test_mask.cpp, independent of the descriptor's
// range code): allowed keys of absolute query position t.
std::vector<bool> literal_mask_row(const MaskDescriptor& m, int64_t t, int64_t tk);
}  // namespace opdlm::test

namespace {

// Measured errors go to the XML report (--gtest_output=xml) as properties.
void record(const std::string& key, double err) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", err);
  ::testing::Test::RecordProperty(key, buf);
}

struct Case {
  std::string name;
  int64_t B, Tq, Tk, Hq, Hkv, D;
  std::vector<MaskDescriptor> masks;
};

// Every mask kind, per-row and shared descriptors, GQA ratios 1 and 3, head dims 4..7.
std::vector<Case> cases() {
  return {
      {"causal_pads_gqa3", 2, 9, 9, 6, 2, 5, {MaskDescriptor::causal(2), MaskDescriptor::causal(0)}},
      {"block_causal_rows", 2, 11, 11, 3, 1, 6,
       {MaskDescriptor::block_causal(4, 5, 2), MaskDescriptor::block_causal(3, 7, 0)}},
      {"block_decode", 2, 3, 10, 4, 4, 4,
       {MaskDescriptor::block_causal(4, 3, 1, 7), MaskDescriptor::block_causal(2, 4, 0, 6)}},
      {"training_gqa3", 2, 15, 15, 6, 2, 7,
       {MaskDescriptor::training(3, 4, 5, 1), MaskDescriptor::training(3, 2, 5, 3)}},
      {"training_shared", 2, 14, 14, 3, 3, 5, {MaskDescriptor::training(4, 3, 5, 1)}},
  };
}

Tensor qkv(const Case& c, int which, DType dt, uint32_t seed) {
  const Shape s = which == 0 ? Shape{c.B, c.Tq, c.Hq, c.D} : Shape{c.B, c.Tk, c.Hkv, c.D};
  return test::random_tensor(s, seed + which, -1.0, 1.0, dt);
}

struct Dense {
  Tensor o, lse;
};

// softmax(scale q k^T over the literal mask) v, one (batch, head, row) at a time, in f64.
Dense dense_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                      const std::vector<MaskDescriptor>& masks, double scale) {
  const Tensor q = q_in.to(DType::f64), k = k_in.to(DType::f64), v = v_in.to(DType::f64);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3), Tk = k.size(1),
                Hkv = k.size(2), G = Hq / Hkv;
  Dense r{Tensor::zeros({B, Tq, Hq, D}, DType::f64), Tensor::zeros({B, Hq, Tq}, DType::f64)};
  const double *Q = q.data<double>(), *K = k.data<double>(), *V = v.data<double>();
  for (int64_t b = 0; b < B; ++b) {
    const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
    for (int64_t i = 0; i < Tq; ++i) {
      const std::vector<bool> allow = test::literal_mask_row(m, m.q_offset + i, Tk);
      for (int64_t h = 0; h < Hq; ++h) {
        std::vector<double> s(Tk, -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j < Tk; ++j) {
          if (!allow[j]) continue;
          double acc = 0;
          for (int64_t e = 0; e < D; ++e)
            acc += Q[((b * Tq + i) * Hq + h) * D + e] * K[((b * Tk + j) * Hkv + h / G) * D + e];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < Tk; ++j) sum += allow[j] ? std::exp(s[j] - mx) : 0.0;
        double* o = r.o.data<double>() + ((b * Tq + i) * Hq + h) * D;
        for (int64_t j = 0; j < Tk; ++j) {
          if (!allow[j]) continue;
          const double p = std::exp(s[j] - mx) / sum;
          for (int64_t e = 0; e < D; ++e) o[e] += p * V[((b * Tk + j) * Hkv + h / G) * D + e];
        }
        r.lse.data<double>()[(b * Hq + h) * Tq + i] = mx + std::log(sum);
      }
    }
  }
  return r;
}

// Textbook backward in f64 from the dense probabilities: ds = p (dout.v - sum_k p dout.v).
void dense_backward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& dout_in,
                    const std::vector<MaskDescriptor>& masks, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Tensor q = q_in.to(DType::f64), k = k_in.to(DType::f64), v = v_in.to(DType::f64),
               dout = dout_in.to(DType::f64);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3), Tk = k.size(1),
                Hkv = k.size(2), G = Hq / Hkv;
  dq = Tensor::zeros(q.shape(), DType::f64);
  dk = Tensor::zeros(k.shape(), DType::f64);
  dv = Tensor::zeros(k.shape(), DType::f64);
  const Tensor lse = dense_attention(q, k, v, masks, scale).lse;
  auto at = [&](const Tensor& t, int64_t b, int64_t i, int64_t h) {
    return ((b * t.size(1) + i) * t.size(2) + h) * D;
  };
  for (int64_t b = 0; b < B; ++b) {
    const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
    for (int64_t i = 0; i < Tq; ++i) {
      const std::vector<bool> allow = test::literal_mask_row(m, m.q_offset + i, Tk);
      for (int64_t h = 0; h < Hq; ++h) {
        const double* Q = q.data<double>() + at(q, b, i, h);
        const double* dO = dout.data<double>() + at(q, b, i, h);
        std::vector<double> p(Tk, 0.0), dp(Tk, 0.0);
        double delta = 0;
        for (int64_t j = 0; j < Tk; ++j) {
          if (!allow[j]) continue;
          const double* K = k.data<double>() + at(k, b, j, h / G);
          const double* V = v.data<double>() + at(k, b, j, h / G);
          double s = 0;
          for (int64_t e = 0; e < D; ++e) s += Q[e] * K[e], dp[j] += dO[e] * V[e];
          p[j] = std::exp(s * scale - lse.item((b * Hq + h) * Tq + i));
          delta += p[j] * dp[j];
        }
        for (int64_t j = 0; j < Tk; ++j) {
          if (!allow[j]) continue;
          const double ds = p[j] * (dp[j] - delta);
          for (int64_t e = 0; e < D; ++e) {
            dq.data<double>()[at(q, b, i, h) + e] += scale * ds * k.data<double>()[at(k, b, j, h / G) + e];
            dk.data<double>()[at(k, b, j, h / G) + e] += scale * ds * Q[e];
            dv.data<double>()[at(k, b, j, h / G) + e] += p[j] * dO[e];
          }
        }
      }
    }
  }
}

// Copy of positions [begin, end) of dimension 1 of a [B, T, H, D] tensor.
Tensor positions(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t B = t.size(0), T = t.size(1), row = t.size(2) * t.size(3);
  Tensor r = Tensor::empty({B, end - begin, t.size(2), t.size(3)}, DType::f64);
  const Tensor s = t.to(DType::f64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = begin; i < end; ++i)
      for (int64_t e = 0; e < row; ++e)
        r.data<double>()[((b * (end - begin)) + i - begin) * row + e] = s.data<double>()[(b * T + i) * row + e];
  return r.to(t.dtype());
}

}  // namespace

TEST(AttentionForward, MatchesDenseReferenceEveryMaskKind) {
  for (const Case& c : cases()) {
    const double scale = 1.0 / std::sqrt(double(c.D));
    for (DType dt : {DType::f64, DType::f32}) {
      const Tensor q = qkv(c, 0, dt, 11), k = qkv(c, 1, dt, 11), v = qkv(c, 2, dt, 11);
      Tensor lse;
      const Tensor o = ops::attention_forward(q, k, v, c.masks, scale, &lse);
      const Dense ref = dense_attention(q, k, v, c.masks, scale);
      const double tol = dt == DType::f64 ? 1e-13 : 1e-6;
      const double eo = test::max_rel_err(o, ref.o), el = test::max_rel_err(lse, ref.lse);
      EXPECT_LE(eo, tol) << c.name << " " << dtype_name(dt);
      EXPECT_LE(el, tol) << c.name << " " << dtype_name(dt);
      record(c.name + "_" + dtype_name(dt) + "_fwd_rel_err", std::max(eo, el));
      EXPECT_EQ(o.dtype(), dt);
      EXPECT_EQ(lse.shape(), (Shape{c.B, c.Hq, c.Tq}));
    }
  }
}

TEST(AttentionForward, LargeScoresStayFiniteInF32) {
  const Case c = cases()[3];
  const Tensor q = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, 5, -10, 10, DType::f32);
  const Tensor k = test::random_tensor({c.B, c.Tk, c.Hkv, c.D}, 6, -10, 10, DType::f32);
  const Tensor v = qkv(c, 2, DType::f32, 7);
  Tensor lse;
  const Tensor o = ops::attention_forward(q, k, v, c.masks, 1.0, &lse);  // scores up to ~700: exp overflows
  const Dense ref = dense_attention(q, k, v, c.masks, 1.0);
  for (int64_t i = 0; i < o.numel(); ++i) ASSERT_TRUE(std::isfinite(o.item(i))) << i;
  EXPECT_LE(test::max_rel_err(o, ref.o), 1e-4);  // scores carry f32 rounding of ~1e-5 relative
  EXPECT_LE(test::max_rel_err(lse, ref.lse), 1e-5);
}

TEST(AttentionForward, MaskedKeysAreNeverRead) {
  // NaN in keys no non-pad row may see (pad keys; in a training row also the noisy block 1 for
  // rows outside it): rows that cannot see them stay exact.
  const Case c = cases()[3];
  Tensor q = qkv(c, 0, DType::f64, 3), k = qkv(c, 1, DType::f64, 3), v = qkv(c, 2, DType::f64, 3);
  const Dense ref = dense_attention(q, k, v, c.masks, 0.5);
  Tensor kn = k.clone(), vn = v.clone();
  const int64_t row = c.Hkv * c.D;
  for (int64_t e = 0; e < row; ++e) {  // batch 1 (pad_left 3): key 1; batch 0: noisy key 1+4+5+3
    kn.data<double>()[(1 * c.Tk + 1) * row + e] = vn.data<double>()[(1 * c.Tk + 1) * row + e] = NAN;
    kn.data<double>()[(0 * c.Tk + 13) * row + e] = vn.data<double>()[(0 * c.Tk + 13) * row + e] = NAN;
  }
  const Tensor o = ops::attention_forward(q, kn, vn, c.masks, 0.5, nullptr);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.Tq; ++i) {
      const bool sees_nan = (b == 1 && i == 1) || (b == 0 && i >= 13);
      for (int64_t e = 0; e < c.Hq * c.D; ++e) {
        const int64_t at = (b * c.Tq + i) * c.Hq * c.D + e;
        if (sees_nan) EXPECT_TRUE(std::isnan(o.item(at))) << b << "," << i;
        else ASSERT_NEAR(o.item(at), ref.o.item(at), 1e-13) << b << "," << i;
      }
    }
}

namespace {
// Analytic gradients of f = sum(attention(q, k, v) * R) vs central differences of f.
void check_backward(const Case& c, DType dt, double eps, double tol) {
  const double scale = 1.0 / std::sqrt(double(c.D));
  Tensor q = qkv(c, 0, dt, 21), k = qkv(c, 1, dt, 21), v = qkv(c, 2, dt, 21);
  const Tensor R = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, 99, -1, 1, dt);
  Tensor lse;
  const Tensor o = ops::attention_forward(q, k, v, c.masks, scale, &lse);
  // Pre-filled outputs must be overwritten, not accumulated.
  Tensor dq = Tensor::full(q.shape(), 7.0, dt), dk, dv;
  ops::attention_backward(q, k, v, o, lse, R, c.masks, scale, dq, dk, dv);
  auto f = [&] { return test::dot(ops::attention_forward(q, k, v, c.masks, scale, nullptr), R); };
  const double eq = test::max_rel_err(dq, test::numeric_grad(f, q, eps));
  const double ek = test::max_rel_err(dk, test::numeric_grad(f, k, eps));
  const double ev = test::max_rel_err(dv, test::numeric_grad(f, v, eps));
  EXPECT_LE(eq, tol) << c.name << " dq " << dtype_name(dt);
  EXPECT_LE(ek, tol) << c.name << " dk " << dtype_name(dt);
  EXPECT_LE(ev, tol) << c.name << " dv " << dtype_name(dt);
  record(c.name + "_" + dtype_name(dt) + "_grad_rel_err", std::max({eq, ek, ev}));
}

// Smaller cases than the forward's: every element is perturbed twice.
std::vector<Case> grad_cases() {
  return {
      {"training_gqa3", 1, 15, 15, 3, 1, 5, {MaskDescriptor::training(3, 4, 5, 1)}},
      {"training_rows", 2, 13, 13, 2, 2, 3,
       {MaskDescriptor::training(2, 3, 4, 2), MaskDescriptor::training(2, 5, 4, 0)}},
      {"causal_pads", 2, 7, 7, 2, 1, 3, {MaskDescriptor::causal(2), MaskDescriptor::causal(0)}},
      {"block_decode", 1, 3, 9, 3, 1, 4, {MaskDescriptor::block_causal(2, 3, 1, 5)}},
  };
}
}  // namespace

TEST(AttentionBackward, MatchesFiniteDifferencesF64) {
  for (const Case& c : grad_cases()) check_backward(c, DType::f64, 1e-6, 1e-6);
}

TEST(AttentionBackward, MatchesFiniteDifferencesF32) {
  for (const Case& c : grad_cases()) check_backward(c, DType::f32, 1e-2, 1e-3);
}

TEST(AttentionBackward, ThreadedTilesMatchDenseReference) {
  // Large enough for the OpenMP path, several query tiles (16) and key tiles (32), partial last tiles.
  const Case c{"training_large", 2, 70, 70, 4, 2, 16,
               {MaskDescriptor::training(4, 13, 27, 3), MaskDescriptor::training(4, 16, 27, 0)}};
  const double scale = 0.25;
  for (DType dt : {DType::f64, DType::f32}) {
    const Tensor q = qkv(c, 0, dt, 41), k = qkv(c, 1, dt, 41), v = qkv(c, 2, dt, 41);
    const Tensor dout = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, 45, -1, 1, dt);
    Tensor lse, dq, dk, dv, rq, rk, rv;
    const Tensor o = ops::attention_forward(q, k, v, c.masks, scale, &lse);
    ops::attention_backward(q, k, v, o, lse, dout, c.masks, scale, dq, dk, dv);
    dense_backward(q, k, v, dout, c.masks, scale, rq, rk, rv);
    const double tol = dt == DType::f64 ? 1e-13 : 1e-5;
    const double e[4] = {test::max_rel_err(o, dense_attention(q, k, v, c.masks, scale).o),
                         test::max_rel_err(dq, rq), test::max_rel_err(dk, rk), test::max_rel_err(dv, rv)};
    const char* what[4] = {"o", "dq", "dk", "dv"};
    for (int i = 0; i < 4; ++i) EXPECT_LE(e[i], tol) << what[i] << " " << dtype_name(dt);
    record(c.name + "_" + dtype_name(dt) + "_rel_err", *std::max_element(e, e + 4));
  }
}

namespace {
// Shapes with several tiles of the blocked kernel (about 128 stacked rows = positions x G heads per
// tile), every GQA ratio 1..4, head dims that are and are not multiples of the kernel's 16, keys that
// do not fill the last 16-column panel, and each mask kind with pads, decode offsets, per-row masks.
std::vector<Case> tiled_cases() {
  return {
      {"causal_pads_g2", 2, 150, 150, 4, 2, 32, {MaskDescriptor::causal(3), MaskDescriptor::causal(0)}},
      {"training_pads_g1", 2, 163, 163, 2, 2, 20,
       {MaskDescriptor::training(16, 35, 60, 8), MaskDescriptor::training(16, 51, 56, 0)}},
      {"training_g4", 1, 130, 130, 4, 1, 16, {MaskDescriptor::training(4, 24, 52, 2)}},
      {"block_decode_g3", 2, 100, 171, 6, 2, 24,
       {MaskDescriptor::block_causal(8, 40, 5, 71), MaskDescriptor::block_causal(4, 37, 0, 70)}},
      {"block_causal_shared_g2", 3, 140, 140, 4, 2, 8, {MaskDescriptor::block_causal(16, 25, 4)}},
      // 32 (batch row, kv head) pairs: each backward task takes all tiles of one pair.
      {"causal_32_pairs", 8, 140, 140, 8, 4, 8,
       {MaskDescriptor::causal(0), MaskDescriptor::causal(1), MaskDescriptor::causal(2), MaskDescriptor::causal(3),
        MaskDescriptor::causal(4), MaskDescriptor::causal(5), MaskDescriptor::causal(6), MaskDescriptor::causal(7)}},
  };
}

struct Grads {
  Tensor o, lse, dq, dk, dv;
};

Grads run_attention(const Case& c, DType dt, double scale, uint32_t seed) {
  const Tensor q = qkv(c, 0, dt, seed), k = qkv(c, 1, dt, seed), v = qkv(c, 2, dt, seed);
  const Tensor dout = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, seed + 7, -1, 1, dt);
  Grads g;
  g.o = ops::attention_forward(q, k, v, c.masks, scale, &g.lse);
  ops::attention_backward(q, k, v, g.o, g.lse, dout, c.masks, scale, g.dq, g.dk, g.dv);
  return g;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.numel() == b.numel() &&
         std::memcmp(a.raw_data(), b.raw_data(), static_cast<size_t>(a.numel()) * dtype_size(a.dtype())) == 0;
}

// Elementwise: non-finite exactly where the reference is (the same Inf, or NaN), elsewhere within tol
// of max |finite ref|.
void expect_same_nonfinite(const Tensor& got, const Tensor& ref, double tol, const std::string& what) {
  ASSERT_EQ(got.numel(), ref.numel()) << what;
  double scale = 1e-12;
  for (int64_t i = 0; i < ref.numel(); ++i)
    if (std::isfinite(ref.item(i))) scale = std::max(scale, std::fabs(ref.item(i)));
  int64_t bad = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = ref.item(i), g = got.item(i);
    if (std::isnan(r)) {
      ++bad;
      EXPECT_TRUE(std::isnan(g)) << what << " element " << i << " is " << g << ", expected NaN";
    } else if (std::isinf(r)) {
      ++bad;
      EXPECT_EQ(g, r) << what << " element " << i;
    } else {
      ASSERT_TRUE(std::isfinite(g)) << what << " element " << i << " is " << g << ", expected " << r;
      ASSERT_LE(std::fabs(g - r), tol * scale) << what << " element " << i;
    }
  }
  EXPECT_GT(bad, 0) << what << ": the reference is all finite, the case tests nothing";
}
}  // namespace

TEST(AttentionBlocked, ManyTilesMatchDenseReference) {
  for (const Case& c : tiled_cases()) {
    const double scale = 1.0 / std::sqrt(double(c.D));
    for (DType dt : {DType::f64, DType::f32}) {
      const Tensor q = qkv(c, 0, dt, 51), k = qkv(c, 1, dt, 51), v = qkv(c, 2, dt, 51);
      const Tensor dout = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, 58, -1, 1, dt);
      Tensor lse, dq, dk, dv, rq, rk, rv;
      const Tensor o = ops::attention_forward(q, k, v, c.masks, scale, &lse);
      ops::attention_backward(q, k, v, o, lse, dout, c.masks, scale, dq, dk, dv);
      const Dense ref = dense_attention(q, k, v, c.masks, scale);
      dense_backward(q, k, v, dout, c.masks, scale, rq, rk, rv);
      const double tol = dt == DType::f64 ? 1e-13 : 1e-5;
      const double e[5] = {test::max_rel_err(o, ref.o), test::max_rel_err(lse, ref.lse), test::max_rel_err(dq, rq),
                           test::max_rel_err(dk, rk), test::max_rel_err(dv, rv)};
      const char* what[5] = {"o", "lse", "dq", "dk", "dv"};
      for (int i = 0; i < 5; ++i) EXPECT_LE(e[i], tol) << c.name << " " << what[i] << " " << dtype_name(dt);
      record(c.name + "_" + dtype_name(dt) + "_rel_err", *std::max_element(e, e + 5));
    }
  }
}

TEST(AttentionBlocked, SameBitsForAnyThreadCount) {
  const int saved = omp_get_max_threads();
  for (const Case& c : {tiled_cases()[0], tiled_cases()[1], tiled_cases()[3], tiled_cases()[5]})
    for (DType dt : {DType::f32, DType::f64}) {
      omp_set_num_threads(1);
      const Grads one = run_attention(c, dt, 0.3, 61);
      for (int threads : {2, 3, 5}) {
        omp_set_num_threads(threads);
        const Grads many = run_attention(c, dt, 0.3, 61);
        EXPECT_TRUE(same_bits(one.o, many.o)) << c.name << " o " << threads << " threads " << dtype_name(dt);
        EXPECT_TRUE(same_bits(one.lse, many.lse)) << c.name << " lse " << threads << " threads";
        EXPECT_TRUE(same_bits(one.dq, many.dq)) << c.name << " dq " << threads << " threads " << dtype_name(dt);
        EXPECT_TRUE(same_bits(one.dk, many.dk)) << c.name << " dk " << threads << " threads " << dtype_name(dt);
        EXPECT_TRUE(same_bits(one.dv, many.dv)) << c.name << " dv " << threads << " threads " << dtype_name(dt);
      }
    }
  omp_set_num_threads(saved);
}

TEST(AttentionBlocked, NonFiniteValuesReachOnlyRowsAllowedToSeeThem) {
  // Several tiles per batch row. Batch 0: NaN in dout of pad row 1, which attends to key 1 only, so
  // only its dq and the dk, dv of key 1 become NaN. Batch 1: Inf in value 0 of kv head 0 (a pad key
  // that only pad row 0 sees): only that row's outputs (heads of group 0), its dq and dk of key 0.
  const Case c = tiled_cases()[0];
  for (DType dt : {DType::f64, DType::f32}) {
    const double scale = 0.2;
    const Tensor q = qkv(c, 0, dt, 71), k = qkv(c, 1, dt, 71);
    Tensor v = qkv(c, 2, dt, 71), dout = test::random_tensor({c.B, c.Tq, c.Hq, c.D}, 78, -1, 1, dt);
    const MaskDescriptor pad3 = MaskDescriptor::causal(3);
    const std::vector<MaskDescriptor> masks{pad3, pad3};
    auto set = [](Tensor& t, int64_t at, double x) {
      if (t.dtype() == DType::f64) t.data<double>()[at] = x;
      else t.data<float>()[at] = static_cast<float>(x);
    };
    set(dout, (0 * c.Tq + 1) * c.Hq * c.D + 0 * c.D + 5, NAN);                // batch 0, row 1, head 0
    set(v, (1 * c.Tk + 0) * c.Hkv * c.D + 0 * c.D + 3, INFINITY);             // batch 1, key 0, kv head 0
    Tensor lse, dq, dk, dv, rq, rk, rv;
    const Tensor o = ops::attention_forward(q, k, v, masks, scale, &lse);
    ops::attention_backward(q, k, v, o, lse, dout, masks, scale, dq, dk, dv);
    const Dense ref = dense_attention(q, k, v, masks, scale);
    dense_backward(q, k, v, dout, masks, scale, rq, rk, rv);
    const double tol = dt == DType::f64 ? 1e-13 : 1e-5;
    const std::string n = std::string(" ") + dtype_name(dt);
    expect_same_nonfinite(o, ref.o, tol, "o" + n);
    expect_same_nonfinite(dq, rq, tol, "dq" + n);
    expect_same_nonfinite(dk, rk, tol, "dk" + n);
    expect_same_nonfinite(dv, rv, tol, "dv" + n);
  }
}

TEST(AttentionDecode, RowsWithOffsetMatchFullForward) {
  // One row: pad 2, P 5 (not a multiple of b = 4), 10 response tokens: T = 17.
  const int64_t T = 17, H = 4, Hkv = 2, D = 6, L0 = 7;
  const Tensor q = test::random_tensor({1, T, H, D}, 31), k = test::random_tensor({1, T, Hkv, D}, 32),
               v = test::random_tensor({1, T, Hkv, D}, 33);
  const double scale = 0.4;
  for (auto kind : {MaskDescriptor::Kind::causal, MaskDescriptor::Kind::block_causal}) {
    auto mask = [&](int64_t off) {
      return kind == MaskDescriptor::Kind::causal ? MaskDescriptor::causal(2, off)
                                                  : MaskDescriptor::block_causal(4, 5, 2, off);
    };
    const MaskDescriptor full_mask = mask(0);
    const Tensor full = ops::attention_forward(q, k, v, {&full_mask, 1}, scale, nullptr);
    // (first query row, query rows, keys): the partial last block against every key, a single row,
    // and the middle block [L0+4, L0+8) against a KV cache that ends with it.
    const int64_t layouts[3][3] = {{L0 + 8, 2, T}, {T - 1, 1, T}, {L0 + 4, 4, L0 + 8}};
    for (const auto& l : layouts) {
      const MaskDescriptor m = mask(l[0]);
      const Tensor o = ops::attention_forward(positions(q, l[0], l[0] + l[1]), positions(k, 0, l[2]),
                                              positions(v, 0, l[2]), {&m, 1}, scale, nullptr);
      EXPECT_LE(test::max_abs_err(o, positions(full, l[0], l[0] + l[1])), 1e-15)
          << mask_kind_name(kind) << " rows from " << l[0];
    }
  }
}

TEST(AttentionDecode, FewRowTilesMatchDenseReferenceInF32) {
  // Decoding shapes (1 or 2 query positions, G = 1..2 heads a group: <= 4 stacked rows) take the
  // vectorised per-row forward; head dims 5, 8, 12, 32 cover its lane tails. A NaN key and value that
  // one row may not see (pad key 0 of batch row 1) must not reach that row.
  for (int64_t D : {5, 8, 12, 32})
    for (int64_t tq : {1, 2}) {
      const int64_t B = 3, Tk = 37, Hq = 4, Hkv = 2;
      const std::vector<MaskDescriptor> masks = {MaskDescriptor::causal(0, Tk - tq), MaskDescriptor::causal(1, Tk - tq),
                                                 MaskDescriptor::block_causal(4, 9, 2, Tk - tq)};
      const Case c{"decode", B, tq, Tk, Hq, Hkv, D, masks};
      Tensor q = qkv(c, 0, DType::f32, 41), k = qkv(c, 1, DType::f32, 41), v = qkv(c, 2, DType::f32, 41);
      const double scale = 1.0 / std::sqrt(double(D));
      Tensor lse;
      const Tensor o = ops::attention_forward(q, k, v, masks, scale, &lse);
      const Dense ref = dense_attention(q, k, v, masks, scale);
      EXPECT_LE(test::max_rel_err(o, ref.o), 1e-6) << "D " << D << " tq " << tq;
      EXPECT_LE(test::max_rel_err(lse, ref.lse), 1e-6) << "D " << D << " tq " << tq;
      for (int64_t e = 0; e < Hkv * D; ++e)
        k.data<float>()[(1 * Tk + 0) * Hkv * D + e] = v.data<float>()[(1 * Tk + 0) * Hkv * D + e] = NAN;
      const Tensor on = ops::attention_forward(q, k, v, masks, scale, nullptr);
      for (int64_t i = 0; i < on.numel(); ++i) {
        const bool row1 = i / (tq * Hq * D) == 1;
        if (row1) ASSERT_EQ(on.item(i), o.item(i)) << "batch row 1 saw its pad key, element " << i;
      }
    }
}

namespace {
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& words) {
  try {
    fn();
    FAIL() << "no error; expected one mentioning " << words[0];
  } catch (const Error& e) {
    const std::string w = e.what();
    for (const auto& s : words) EXPECT_NE(w.find(s), std::string::npos) << "missing '" << s << "' in: " << w;
  }
}
}  // namespace

TEST(AttentionErrors, BadInputsNameTensorAndDimension) {
  const auto m = MaskDescriptor::causal();
  const std::vector<MaskDescriptor> one{m}, three{m, m, m};
  const Tensor q({2, 5, 4, 8}), k({2, 5, 2, 8}), v({2, 5, 2, 8});
  auto fwd = [&](const Tensor& a, const Tensor& b, const Tensor& c, std::span<const MaskDescriptor> ms) {
    return [=] { ops::attention_forward(a, b, c, ms, 1.0, nullptr); };
  };
  expect_error(fwd(q, Tensor({2, 5, 2, 6}), v, one), {"'k'", "dimension 3 is 6, expected 8"});
  expect_error(fwd(q, k, Tensor({2, 4, 2, 8}), one), {"'v'", "dimension 1 is 4, expected 5"});
  expect_error(fwd(q, Tensor({3, 5, 2, 8}), v, one), {"'k'", "dimension 0 is 3, expected 2"});
  expect_error(fwd(Tensor({2, 5, 5, 8}), k, v, one), {"'q'", "dimension 2", "not a multiple", "2"});
  expect_error(fwd(q, Tensor({2, 5, 2, 8}, DType::f64), v, one), {"'k'", "dtype of 'q'"});
  expect_error(fwd(Tensor({2, 5, 4, 8}, DType::bf16), k, v, one), {"'q'", "unsupported dtype bf16"});
  expect_error(fwd(q, k, Tensor({2, 5, 2, 8}, DType::i32), one), {"'v'", "unsupported dtype i32"});
  expect_error(fwd(Tensor({2, 5, 32}), k, v, one), {"'q'", "3 dimensions, expected 4"});
  expect_error(fwd(q, k, v, three), {"masks", "got 3 descriptors", "expected 1 or 2"});
  const std::vector<MaskDescriptor> bad{m, MaskDescriptor::training(2, 1, 3)};
  expect_error(fwd(q, k, v, bad), {"masks[1]", "response_len", "7"});
  const std::vector<MaskDescriptor> off{MaskDescriptor::causal(0, 1)};
  expect_error(fwd(q, k, v, off), {"masks[0]", "q_offset"});

  Tensor lse;
  const Tensor o = ops::attention_forward(q, k, v, one, 1.0, &lse);
  auto bwd = [&](const Tensor& o2, const Tensor& lse2, const Tensor& dout, Tensor dq) {
    return [=]() mutable {
      Tensor dk, dv;
      ops::attention_backward(q, k, v, o2, lse2, dout, one, 1.0, dq, dk, dv);
    };
  };
  expect_error(bwd(o, lse, Tensor({2, 5, 4, 7}), Tensor()), {"'dout'", "dimension 3 is 7, expected 8"});
  expect_error(bwd(o, lse, o.to(DType::f64), Tensor()), {"'dout'", "dtype of 'q'"});
  expect_error(bwd(Tensor({2, 6, 4, 8}), lse, o, Tensor()), {"'o'", "dimension 1 is 6, expected 5"});
  expect_error(bwd(o, Tensor({2, 5, 4}), o, Tensor()), {"'lse'", "dimension 1 is 5, expected 4"});
  expect_error(bwd(o, lse, o, Tensor({2, 5, 4, 9})), {"'dq'", "dimension 3 is 9, expected 8"});
  expect_error(bwd(o, lse, o, Tensor({2, 5, 4, 8}, DType::f64)), {"'dq'", "unsupported dtype f64"});
  Tensor bad_lse = Tensor({2, 4, 4});
  expect_error([&] { ops::attention_forward(q, k, v, one, 1.0, &bad_lse); }, {"'lse'", "dimension 2 is 4, expected 5"});
}
