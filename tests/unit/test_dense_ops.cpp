// Tests for the dense CPU ops (matmul/linear, embedding, RMSNorm, RoPE, SwiGLU, residual): forward
// against naive references, every backward against central differences in f64 and f32, the
// gradient accumulate/overwrite convention, and error messages that name the tensor and dimension.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "opdlm/ops/embedding.hpp"
#include "opdlm/ops/matmul.hpp"
#include "opdlm/ops/residual.hpp"
#include "opdlm/ops/rmsnorm.hpp"
#include "opdlm/ops/rope.hpp"
#include "opdlm/ops/swiglu.hpp"
#include "test_util.hpp"

using namespace opdlm;
using opdlm::test::error_of;
using namespace opdlm::ops;
using opdlm::test::dot;
using opdlm::test::max_abs_err;
using opdlm::test::max_rel_err;
using opdlm::test::numeric_grad;
using opdlm::test::random_ids;
using opdlm::test::random_tensor;

namespace {

const DType kFloatTypes[] = {DType::f64, DType::f32};

// Finite-difference tolerances from the brief: f64 <= 1e-6, f32 <= 1e-3 (relative to max |grad|).
double fd_tol(DType t) { return t == DType::f64 ? 1e-6 : 1e-3; }
// f32 needs a larger step: rounding of the forward (~1e-7 relative) divided by eps dominates otherwise.
double fd_eps(DType t) { return t == DType::f64 ? 1e-6 : 1e-2; }

// max rel error of `analytic` against d<fwd(), proj>/dx by central differences.
double fd_err(const std::function<Tensor()>& fwd, Tensor& x, const Tensor& analytic, const Tensor& proj,
              const char* what) {
  Tensor num = numeric_grad([&] { return dot(fwd(), proj); }, x, fd_eps(x.dtype()));
  const double e = max_rel_err(analytic, num);
  std::printf("[fd] %-40s %s max_rel_err %.3g\n", what, dtype_name(x.dtype()), e);
  return e;
}

Tensor rnd(const Shape& s, uint32_t seed, DType t, double lo = -1, double hi = 1) {
  return random_tensor(s, seed, lo, hi, t);
}

void expect_error_mentions(const std::function<void()>& f, std::initializer_list<const char*> parts) {
  const std::string msg = error_of(f);
  ASSERT_FALSE(msg.empty()) << "expected an opdlm::Error";
  for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
}

// Naive reference: op(a) @ op(b) for one 2-D slice, in double.
std::vector<double> ref_mm(const std::vector<double>& a, bool ta, const std::vector<double>& b, bool tb, int64_t m,
                           int64_t n, int64_t k, size_t aoff = 0, size_t boff = 0) {
  std::vector<double> c(size_t(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[aoff + size_t(p * m + i)] : a[aoff + size_t(i * k + p)];
        const double bv = tb ? b[boff + size_t(j * k + p)] : b[boff + size_t(p * n + j)];
        s += av * bv;
      }
      c[size_t(i * n + j)] = s;
    }
  return c;
}

double max_diff(const Tensor& t, const std::vector<double>& ref, size_t off = 0) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) m = std::max(m, std::fabs(t.item(int64_t(off + i)) - ref[i]));
  return m;
}

}  // namespace

// ==== matmul =========================================================================================
TEST(MatmulTest, TwoDimAllTransposes) {
  const int64_t m = 5, n = 4, k = 7;
  for (DType dt : kFloatTypes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        Tensor a = rnd(ta ? Shape{k, m} : Shape{m, k}, 1, dt);
        Tensor b = rnd(tb ? Shape{n, k} : Shape{k, n}, 2, dt);
        Tensor c = matmul(a, ta, b, tb);
        ASSERT_EQ(c.shape(), (Shape{m, n}));
        EXPECT_EQ(c.dtype(), dt);
        auto ref = ref_mm(a.to_f64_vector(), ta, b.to_f64_vector(), tb, m, n, k);
        EXPECT_LT(max_diff(c, ref), dt == DType::f64 ? 1e-13 : 1e-5) << ta << tb;
      }
}

TEST(MatmulTest, AlphaBetaAccumulate) {
  for (DType dt : kFloatTypes) {
    Tensor a = rnd({3, 4}, 3, dt), b = rnd({4, 2}, 4, dt);
    Tensor c0 = rnd({3, 2}, 5, dt);
    Tensor c = c0.clone();
    matmul(a, false, b, false, c, 0.5, 2.0);
    auto ab = ref_mm(a.to_f64_vector(), false, b.to_f64_vector(), false, 3, 2, 4);
    for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(c.item(i), 0.5 * ab[size_t(i)] + 2.0 * c0.item(i), 1e-5);
    // beta = 0 ignores whatever c held (even NaN).
    c.fill(NAN);
    matmul(a, false, b, false, c);
    EXPECT_LT(max_diff(c, ab), 1e-5);
  }
}

TEST(MatmulTest, BatchedAndBroadcast) {
  const int64_t B = 3, m = 4, n = 5, k = 6;
  for (DType dt : kFloatTypes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        Tensor a = rnd(ta ? Shape{B, k, m} : Shape{B, m, k}, 6, dt);
        Tensor b3 = rnd(tb ? Shape{B, n, k} : Shape{B, k, n}, 7, dt);
        Tensor b2 = rnd(tb ? Shape{n, k} : Shape{k, n}, 8, dt);
        Tensor c3 = matmul(a, ta, b3, tb), c2 = matmul(a, ta, b2, tb);
        ASSERT_EQ(c3.shape(), (Shape{B, m, n}));
        ASSERT_EQ(c2.shape(), (Shape{B, m, n}));
        auto av = a.to_f64_vector(), b3v = b3.to_f64_vector(), b2v = b2.to_f64_vector();
        for (int64_t i = 0; i < B; ++i) {
          auto r3 = ref_mm(av, ta, b3v, tb, m, n, k, size_t(i * m * k), size_t(i * k * n));
          auto r2 = ref_mm(av, ta, b2v, tb, m, n, k, size_t(i * m * k), 0);
          EXPECT_LT(max_diff(c3, r3, size_t(i * m * n)), 1e-5);
          EXPECT_LT(max_diff(c2, r2, size_t(i * m * n)), 1e-5);
        }
      }
}

TEST(MatmulTest, EmptyInnerDimension) {
  Tensor a({3, 0}), b({0, 2});
  Tensor c = Tensor::full({3, 2}, 4.0);
  matmul(a, false, b, false, c, 1.0, 0.5);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(c.item(i), 2.0);
}

TEST(MatmulTest, BadInputsNameTensorAndDimension) {
  Tensor a({3, 4}), b({5, 2});
  expect_error_mentions([&] { matmul(a, false, b, false); }, {"'b'", "dimension 0 is 5, expected 4"});
  expect_error_mentions([&] { matmul(a, false, Tensor({4, 2}, DType::bf16), false); }, {"'b'", "bf16"});
  expect_error_mentions([&] { matmul(Tensor({3, 4}, DType::i32), false, b, false); }, {"'a'", "i32"});
  expect_error_mentions([&] { matmul(a, false, Tensor({4, 2}, DType::f64), false); }, {"'b'", "dtype of 'a'"});
  expect_error_mentions([&] { matmul(Tensor({2, 3, 4, 5}), false, b, false); }, {"'a'", "4 dimensions"});
  expect_error_mentions([&] { matmul(Tensor({2, 3, 4}), false, Tensor({3, 4, 2}), false); },
                        {"'b'", "dimension 0 is 3, expected 2", "batch"});
  Tensor c({3, 3});
  expect_error_mentions([&] { matmul(a, false, Tensor({4, 2}), false, c); }, {"'c'", "dimension 1 is 3, expected 2"});
  Tensor sq({3, 3});
  Tensor alias = sq;
  expect_error_mentions([&] { matmul(sq, false, Tensor({3, 3}), false, alias); }, {"'c'", "shares memory with 'a'"});
  Tensor undefined_c;
  expect_error_mentions([&] { matmul(a, false, Tensor({4, 2}), false, undefined_c, 1.0, 1.0); }, {"'c'", "beta"});
}

// ==== linear =========================================================================================
TEST(LinearTest, ForwardMatchesReference) {
  for (DType dt : kFloatTypes) {
    Tensor x = rnd({5, 7}, 10, dt), w = rnd({6, 7}, 11, dt);
    Tensor y = linear_forward(x, w);
    ASSERT_EQ(y.shape(), (Shape{5, 6}));
    auto ref = ref_mm(x.to_f64_vector(), false, w.to_f64_vector(), true, 5, 6, 7);
    EXPECT_LT(max_diff(y, ref), 1e-5);
  }
}

TEST(LinearTest, BackwardFiniteDifferences) {
  for (DType dt : kFloatTypes) {
    Tensor x = rnd({5, 7}, 12, dt), w = rnd({6, 7}, 13, dt);
    Tensor proj = rnd({5, 6}, 14, DType::f64);
    Tensor dy = proj.to(dt);
    Tensor dx, dw;
    linear_backward(x, w, dy, &dx, &dw);
    auto fwd = [&] { return linear_forward(x, w); };
    EXPECT_LE(fd_err(fwd, x, dx, proj, "Linear dx"), fd_tol(dt));
    EXPECT_LE(fd_err(fwd, w, dw, proj, "Linear dw"), fd_tol(dt));
  }
}

TEST(LinearTest, WeightGradAccumulatesInputGradOverwrites) {
  Tensor x = rnd({4, 3}, 15, DType::f64), w = rnd({2, 3}, 16, DType::f64), dy = rnd({4, 2}, 17, DType::f64);
  Tensor dx1, dw1;
  linear_backward(x, w, dy, &dx1, &dw1);
  Tensor dx = Tensor::full({4, 3}, 100.0, DType::f64), dw = Tensor::full({2, 3}, 1.0, DType::f64);
  linear_backward(x, w, dy, &dx, &dw);
  linear_backward(x, w, dy, &dx, &dw);
  EXPECT_LT(max_abs_err(dx, dx1), 1e-15);  // overwritten, not 100 + ...
  for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(dw.item(i), 1.0 + 2 * dw1.item(i), 1e-14);
  // Null outputs are skipped.
  Tensor only_dw;
  linear_backward(x, w, dy, nullptr, &only_dw);
  EXPECT_LT(max_abs_err(only_dw, dw1), 1e-15);
  EXPECT_NO_THROW(linear_backward(x, w, dy, nullptr, nullptr));
}

TEST(LinearTest, BadInputsNameTensorAndDimension) {
  Tensor x({4, 3}), w({2, 5});
  expect_error_mentions([&] { linear_forward(x, w); }, {"'x'", "dimension 1 is 3, expected 5", "'w'"});
  expect_error_mentions([&] { linear_forward(Tensor({4, 3, 1}), Tensor({2, 3})); }, {"'x'", "3 dimensions, expected 2"});
  expect_error_mentions([&] { linear_forward(Tensor({4, 3}, DType::bf16), Tensor({2, 3})); }, {"'x'", "bf16"});
  Tensor w2({2, 3}), dy({4, 3});
  expect_error_mentions([&] { linear_backward(x, w2, dy, nullptr, nullptr); }, {"'dy'", "dimension 1 is 3, expected 2"});
  Tensor dw_bad({3, 3});
  expect_error_mentions([&] { linear_backward(x, w2, Tensor({4, 2}), nullptr, &dw_bad); },
                        {"'dw'", "dimension 0 is 3, expected 2"});
  Tensor dx_bad({4, 3}, DType::f64);
  expect_error_mentions([&] { linear_backward(x, w2, Tensor({4, 2}), &dx_bad, nullptr); }, {"'dx'", "f64"});
}

// ==== embedding ======================================================================================
TEST(EmbeddingTest, ForwardGathersRows) {
  for (DType dt : kFloatTypes) {
    Tensor table = rnd({7, 5}, 20, dt);
    Tensor ids = Tensor::from_vector(std::vector<int32_t>{3, 0, 3, 6}, {4});
    Tensor out = embedding_forward(table, ids);
    ASSERT_EQ(out.shape(), (Shape{4, 5}));
    const int32_t* id = ids.data<int32_t>();
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 5; ++j) EXPECT_EQ(out.item(i * 5 + j), table.item(id[i] * 5 + j));
  }
}

TEST(EmbeddingTest, BackwardFiniteDifferencesRepeatedIds) {
  for (DType dt : kFloatTypes) {
    Tensor table = rnd({6, 4}, 21, dt);
    Tensor ids = Tensor::from_vector(std::vector<int32_t>{2, 5, 2, 2, 0, 5, 1}, {7});  // 3 never used
    Tensor proj = rnd({7, 4}, 22, DType::f64);
    Tensor dtable = Tensor::zeros({6, 4}, dt);
    embedding_backward(ids, proj.to(dt), dtable);
    EXPECT_LE(fd_err([&] { return embedding_forward(table, ids); }, table, dtable, proj, "Embedding dtable"),
              fd_tol(dt));
    for (int64_t j = 0; j < 4; ++j) EXPECT_EQ(dtable.item(3 * 4 + j), 0.0);
  }
}

TEST(EmbeddingTest, BackwardAccumulatesAndIsDeterministic) {
  // Large enough for the OpenMP path; many repeats of few ids.
  const int64_t n = 4096, V = 7, D = 130;
  Tensor ids = random_ids({n}, 23, V);
  Tensor dy = rnd({n, D}, 24, DType::f32);
  Tensor d1 = Tensor::full({V, D}, 0.25, DType::f32), d2 = d1.clone();
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  embedding_backward(ids, dy, d1);
  omp_set_num_threads(2);
  embedding_backward(ids, dy, d2);
  omp_set_num_threads(saved);
  EXPECT_EQ(max_abs_err(d1, d2), 0.0);  // bitwise equal across thread counts
  // Accumulated on top of the 0.25 that was there; compare with a double reference.
  std::vector<double> ref(size_t(V * D), 0.25);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < D; ++j) ref[size_t(ids.data<int32_t>()[i] * D + j)] += dy.item(i * D + j);
  EXPECT_LT(max_diff(d1, ref), 1e-3);
}

TEST(EmbeddingTest, BadIdsAndShapes) {
  Tensor table({10, 4});
  Tensor bad = Tensor::from_vector(std::vector<int32_t>{1, 2, 10, 3}, {4});
  expect_error_mentions([&] { embedding_forward(table, bad); }, {"'ids'", "element 2", "is 10", "[0, 10)"});
  Tensor neg = Tensor::from_vector(std::vector<int32_t>{-1}, {1});
  expect_error_mentions([&] { embedding_forward(table, neg); }, {"'ids'", "element 0", "is -1"});
  Tensor dtable({10, 4});
  Tensor dtable_before = dtable.clone();
  expect_error_mentions([&] { embedding_backward(bad, Tensor({4, 4}), dtable); }, {"'ids'", "element 2", "is 10"});
  EXPECT_EQ(max_abs_err(dtable, dtable_before), 0.0);  // nothing written before the check
  expect_error_mentions([&] { embedding_forward(table, Tensor({4}, DType::f32)); }, {"'ids'", "f32"});
  expect_error_mentions([&] { embedding_forward(Tensor({10, 4}, DType::bf16), Tensor({2}, DType::i32)); },
                        {"'table'", "bf16"});
  Tensor ok = Tensor::from_vector(std::vector<int32_t>{1, 2}, {2});
  expect_error_mentions([&] { embedding_backward(ok, Tensor({2, 5}), dtable); }, {"'dy'", "dimension 1 is 5, expected 4"});
  expect_error_mentions([&] { embedding_backward(ok, Tensor({3, 4}), dtable); }, {"'dy'", "dimension 0 is 3, expected 2"});
}

// ==== RMSNorm ========================================================================================
TEST(RmsNormTest, ForwardMatchesReference) {
  for (DType dt : kFloatTypes) {
    const int64_t rows = 3, d = 8;
    Tensor x = rnd({rows, d}, 30, dt), w = rnd({d}, 31, dt, 0.5, 1.5);
    Tensor rstd;
    Tensor y = rmsnorm_forward(x, w, 1e-6, &rstd);
    ASSERT_EQ(rstd.shape(), (Shape{rows}));
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += x.item(r * d + j) * x.item(r * d + j);
      const double rs = 1 / std::sqrt(ss / d + 1e-6);
      EXPECT_NEAR(rstd.item(r), rs, 1e-6 * rs);
      for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(y.item(r * d + j), x.item(r * d + j) * rs * w.item(j), 1e-6);
    }
  }
}

TEST(RmsNormTest, BackwardFiniteDifferences) {
  for (DType dt : kFloatTypes) {
    const int64_t rows = 4, d = 12;
    Tensor x = rnd({rows, d}, 32, dt), w = rnd({d}, 33, dt, 0.5, 1.5);
    Tensor proj = rnd({rows, d}, 34, DType::f64);
    const double eps = 1e-5;
    Tensor rstd;
    rmsnorm_forward(x, w, eps, &rstd);
    Tensor dx, dw;
    rmsnorm_backward(x, w, rstd, proj.to(dt), &dx, &dw);
    auto fwd = [&] { return rmsnorm_forward(x, w, eps); };
    EXPECT_LE(fd_err(fwd, x, dx, proj, "RmsNorm dx"), fd_tol(dt));
    EXPECT_LE(fd_err(fwd, w, dw, proj, "RmsNorm dw"), fd_tol(dt));
  }
}

TEST(RmsNormTest, PerHeadViewAndAccumulation) {
  // q-norm layout: [tokens, heads, head_dim] viewed as [tokens*heads, head_dim]; enough rows for OpenMP.
  const int64_t tokens = 300, heads = 3, hd = 32;
  Tensor q = rnd({tokens, heads, hd}, 35, DType::f32);
  Tensor w = rnd({hd}, 36, DType::f32);
  Tensor rstd;
  Tensor y = rmsnorm_forward(q.view({-1, hd}), w, 1e-6, &rstd);
  EXPECT_EQ(rstd.shape(), (Shape{tokens * heads}));
  Tensor dy = rnd({tokens * heads, hd}, 37, DType::f32);
  Tensor dw1, dw2 = Tensor::full({hd}, 2.0, DType::f32);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  rmsnorm_backward(q.view({-1, hd}), w, rstd, dy, nullptr, &dw1);
  omp_set_num_threads(2);
  rmsnorm_backward(q.view({-1, hd}), w, rstd, dy, nullptr, &dw2);
  omp_set_num_threads(saved);
  for (int64_t j = 0; j < hd; ++j) EXPECT_EQ(dw2.data<float>()[j], 2.0f + dw1.data<float>()[j]);
}

TEST(RmsNormTest, BadInputsNameTensorAndDimension) {
  Tensor x({4, 8}), w({6});
  expect_error_mentions([&] { rmsnorm_forward(x, w, 1e-6); }, {"'w'", "dimension 0 is 6, expected 8"});
  expect_error_mentions([&] { rmsnorm_forward(Tensor({2, 4, 8}), Tensor({8}), 1e-6); }, {"'x'", "3 dimensions, expected 2"});
  expect_error_mentions([&] { rmsnorm_forward(Tensor({4, 8}, DType::bf16), Tensor({8}), 1e-6); }, {"'x'", "bf16"});
  expect_error_mentions([&] { rmsnorm_forward(x, Tensor({8}, DType::f64), 1e-6); }, {"'w'", "dtype of 'x'"});
  Tensor rstd({3});
  expect_error_mentions([&] { rmsnorm_backward(x, Tensor({8}), rstd, x, nullptr, nullptr); },
                        {"'rstd'", "dimension 0 is 3, expected 4"});
  expect_error_mentions([&] { rmsnorm_backward(x, Tensor({8}), Tensor({4}), Tensor({4, 7}), nullptr, nullptr); },
                        {"'dy'", "dimension 1 is 7, expected 8"});
}

// ==== RoPE ===========================================================================================
namespace {
// Naive rotate-half reference in double for one tensor [T, H, hd].
std::vector<double> ref_rope(const Tensor& x, const std::vector<int32_t>& pos, double theta) {
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2), h = hd / 2;
  std::vector<double> out(size_t(x.numel()));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < H; ++k)
      for (int64_t j = 0; j < hd; ++j) {
        const int64_t i = j % h;
        const double ang = pos[size_t(t)] / std::pow(theta, double(2 * i) / double(hd));
        const int64_t base = (t * H + k) * hd;
        const double xv = x.item(base + j);
        const double rot = j < h ? -x.item(base + j + h) : x.item(base + j - h);
        out[size_t(base + j)] = xv * std::cos(ang) + rot * std::sin(ang);
      }
  return out;
}
}  // namespace

TEST(RopeTest, ForwardMatchesReferenceAtExplicitPositions) {
  // Training layout: pad -> 1, prompt 0..P-1, then x0 and xt both at P..P+L1-1 (positions repeat).
  const std::vector<int32_t> pos = {1, 0, 1, 2, 3, 4, 3, 4, 4000};
  Tensor p = Tensor::from_vector(pos, {9});
  for (double theta : {1e6, 1e4})
    for (DType dt : kFloatTypes) {
      Tensor x = rnd({9, 3, 8}, 40, dt);
      Tensor y = rope_forward(x, p, theta);
      ASSERT_EQ(y.shape(), x.shape());
      EXPECT_LT(max_diff(y, ref_rope(x, pos, theta)), dt == DType::f64 ? 1e-12 : 2e-6) << theta;
    }
  // Position 0 is the identity.
  Tensor x = rnd({2, 1, 4}, 41, DType::f64);
  Tensor y = rope_forward(x, Tensor::from_vector(std::vector<int32_t>{0, 0}, {2}), 1e6);
  EXPECT_EQ(max_abs_err(x, y), 0.0);
}

TEST(RopeTest, BackwardFiniteDifferences) {
  const std::vector<int32_t> pos = {5, 2, 3, 2, 3, 7};  // duplicated, not 0..n-1
  Tensor p = Tensor::from_vector(pos, {6});
  for (double theta : {1e6, 1e4})
    for (DType dt : kFloatTypes) {
      Tensor x = rnd({6, 3, 10}, 42, dt);  // odd head count, head_dim 10
      Tensor proj = rnd({6, 3, 10}, 43, DType::f64);
      Tensor dx = rope_backward(proj.to(dt), p, theta);
      std::string what = std::string("Rope dx theta=") + (theta == 1e6 ? "1e6" : "1e4");
      EXPECT_LE(fd_err([&] { return rope_forward(x, p, theta); }, x, dx, proj, what.c_str()), fd_tol(dt));
    }
}

TEST(RopeTest, TableReuseInverseAndInPlace) {
  Tensor p = Tensor::from_vector(std::vector<int32_t>{0, 9, 9, 100}, {4});
  RopeTable tab = rope_table(p, 16, 1e6, DType::f64);
  EXPECT_EQ(tab.cos.shape(), (Shape{4, 8}));
  Tensor x = rnd({4, 5, 16}, 44, DType::f64);
  Tensor y = rope_forward(x, tab);
  EXPECT_LT(max_abs_err(y, rope_forward(x, p, 1e6)), 1e-15);
  EXPECT_LT(max_abs_err(rope_backward(y, tab), x), 1e-14);  // rotation is orthogonal
  Tensor z = x.clone();
  rope_inplace(z, tab);
  EXPECT_EQ(max_abs_err(z, y), 0.0);
  EXPECT_NEAR(dot(y, y), dot(x, x), 1e-12);  // norm preserved
}

TEST(RopeTest, BadInputsNameTensorAndDimension) {
  Tensor p = Tensor::from_vector(std::vector<int32_t>{0, 1}, {2});
  expect_error_mentions([&] { rope_forward(Tensor({2, 3, 5}), p, 1e6); },
                        {"'x'", "dimension 2 (head_dim) is 5", "even"});
  expect_error_mentions([&] { rope_backward(Tensor({2, 3, 7}), p, 1e6); }, {"'dy'", "dimension 2 (head_dim) is 7"});
  expect_error_mentions([&] { rope_forward(Tensor({3, 2, 4}), p, 1e6); },
                        {"'positions'", "dimension 0 is 2, expected 3", "tokens of 'x'"});
  expect_error_mentions([&] { rope_forward(Tensor({2, 8}), p, 1e6); }, {"'x'", "2 dimensions, expected 3"});
  expect_error_mentions([&] { rope_forward(Tensor({2, 1, 4}, DType::bf16), p, 1e6); }, {"'x'", "bf16"});
  expect_error_mentions([&] { rope_forward(Tensor({2, 1, 4}), Tensor({2}, DType::f32), 1e6); }, {"'positions'", "f32"});
  expect_error_mentions([&] { rope_table(p, 7, 1e6, DType::f32); }, {"head_dim is 7", "even"});
  RopeTable tab = rope_table(p, 8, 1e6, DType::f32);
  expect_error_mentions([&] { rope_forward(Tensor({2, 1, 4}), tab); }, {"'cos'", "dimension 1 is 4, expected 2"});
  expect_error_mentions([&] { rope_forward(Tensor({2, 1, 8}, DType::f64), tab); }, {"'cos'", "dtype of 'x'"});
}

// ==== SwiGLU =========================================================================================
TEST(SwiGLUTest, ForwardMatchesReference) {
  for (DType dt : kFloatTypes) {
    Tensor g = rnd({3, 5}, 50, dt, -6, 6), u = rnd({3, 5}, 51, dt);
    Tensor h = swiglu_forward(g, u);
    for (int64_t i = 0; i < 15; ++i) {
      const double gv = g.item(i);
      EXPECT_NEAR(h.item(i), gv / (1 + std::exp(-gv)) * u.item(i), 1e-6);
    }
  }
  // Extreme gates: no overflow, silu(-inf side) -> 0, silu(+large) -> g.
  Tensor g = Tensor::from_vector(std::vector<float>{-200.f, 200.f}, {1, 2});
  Tensor h = swiglu_forward(g, Tensor::full({1, 2}, 1.0));
  EXPECT_EQ(h.item(0), -0.0);
  EXPECT_EQ(h.item(1), 200.0);
}

TEST(SwiGLUTest, BackwardFiniteDifferences) {
  for (DType dt : kFloatTypes) {
    Tensor g = rnd({4, 6}, 52, dt, -4, 4), u = rnd({4, 6}, 53, dt);
    Tensor proj = rnd({4, 6}, 54, DType::f64);
    Tensor dg = Tensor::full({4, 6}, 7.0, dt), du;  // dg pre-filled: must be overwritten
    swiglu_backward(g, u, proj.to(dt), &dg, &du);
    auto fwd = [&] { return swiglu_forward(g, u); };
    EXPECT_LE(fd_err(fwd, g, dg, proj, "SwiGLU dgate"), fd_tol(dt));
    EXPECT_LE(fd_err(fwd, u, du, proj, "SwiGLU dup"), fd_tol(dt));
  }
}

TEST(SwiGLUTest, BadInputsNameTensorAndDimension) {
  expect_error_mentions([&] { swiglu_forward(Tensor({3, 4}), Tensor({3, 5})); }, {"'up'", "dimension 1 is 5, expected 4"});
  expect_error_mentions([&] { swiglu_forward(Tensor({3, 4, 1}), Tensor({3, 4, 1})); }, {"'gate'", "3 dimensions"});
  expect_error_mentions([&] { swiglu_forward(Tensor({3, 4}, DType::i32), Tensor({3, 4})); }, {"'gate'", "i32"});
  expect_error_mentions([&] { swiglu_backward(Tensor({3, 4}), Tensor({3, 4}), Tensor({2, 4}), nullptr, nullptr); },
                        {"'dh'", "dimension 0 is 2, expected 3"});
  Tensor bad({3, 3});
  expect_error_mentions([&] { swiglu_backward(Tensor({3, 4}), Tensor({3, 4}), Tensor({3, 4}), nullptr, &bad); },
                        {"'dup'", "dimension 1 is 3, expected 4"});
}

// ==== residual =======================================================================================
TEST(ResidualTest, ForwardInPlaceAndBackward) {
  for (DType dt : kFloatTypes) {
    Tensor x = rnd({3, 4}, 60, dt), d = rnd({3, 4}, 61, dt);
    Tensor y = residual_forward(x, d);
    for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(y.item(i), dt == DType::f32 ? double(float(x.item(i) + d.item(i)))
                                                                          : x.item(i) + d.item(i));
    Tensor z = x.clone();
    residual_add_inplace(z, d);
    EXPECT_EQ(max_abs_err(z, y), 0.0);
    // Backward: both branches get dy; the stream gradient accumulates.
    Tensor proj = rnd({3, 4}, 62, DType::f64);
    Tensor dy = proj.to(dt);
    Tensor dstream;
    residual_backward(dy, dstream);  // undefined -> copy of dy
    EXPECT_EQ(max_abs_err(dstream, dy), 0.0);
    residual_backward(dy, dstream);
    for (int64_t i = 0; i < 12; ++i) EXPECT_NEAR(dstream.item(i), 2 * dy.item(i), 1e-6);
    // Finite differences: d<x + delta, proj>/dx = d/ddelta = proj.
    auto fwd = [&] { return residual_forward(x, d); };
    EXPECT_LE(fd_err(fwd, x, dy, proj, "Residual dx"), fd_tol(dt));
    EXPECT_LE(fd_err(fwd, d, dy, proj, "Residual ddelta"), fd_tol(dt));
  }
}

TEST(ResidualTest, BadInputsNameTensorAndDimension) {
  Tensor x({3, 4});
  expect_error_mentions([&] { residual_forward(x, Tensor({3, 5})); }, {"'delta'", "dimension 1 is 5, expected 4"});
  expect_error_mentions([&] { residual_add_inplace(x, Tensor({3})); }, {"'delta'", "1 dimensions, expected 2"});
  expect_error_mentions([&] { residual_forward(x, Tensor({3, 4}, DType::bf16)); }, {"'delta'", "bf16"});
  Tensor acc({2, 4});
  expect_error_mentions([&] { residual_backward(x, acc); }, {"'dy'", "dimension 0 is 3, expected 2"});
}
