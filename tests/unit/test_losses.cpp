// Tests for the loss ops (log-softmax, cross-entropy, the KL family): forward against naive
// references, every backward against central differences in f64 and f32, and error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/ops/softmax.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::ops;
using opdlm::test::dot;
using opdlm::test::max_abs_err;
using opdlm::test::max_rel_err;
using opdlm::test::numeric_grad;
using opdlm::test::random_ids;
using opdlm::test::random_tensor;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const DType kFloatTypes[] = {DType::f64, DType::f32};

// Brief: f64 <= 1e-6, f32 <= 1e-3 (relative to max |grad|).
double fd_tol(DType t) { return t == DType::f64 ? 1e-6 : 1e-3; }
// f32 needs a larger step: the forward's rounding (~1e-7) divided by eps would dominate; the
// O(eps^2) truncation at 1e-2 is far smaller.
double fd_eps(DType t) { return t == DType::f64 ? 1e-6 : 1e-2; }

// Max rel error of `analytic` against d<fwd(), proj>/dx by central differences.
double fd_err(const std::function<Tensor()>& fwd, Tensor& x, const Tensor& analytic, const Tensor& proj,
              const std::string& what) {
  Tensor num = numeric_grad([&] { return dot(fwd(), proj); }, x, fd_eps(x.dtype()));
  const double e = max_rel_err(analytic, num);
  std::printf("[fd] %-44s %s max_rel_err %.3g\n", what.c_str(), dtype_name(x.dtype()), e);
  return e;
}


bool all_finite(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.item(i))) return false;
  return true;
}

std::vector<double> row_of(const Tensor& t, int64_t i) {
  const int64_t V = t.size(1);
  std::vector<double> r(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) r[v] = t.item(i * V + v);
  return r;
}

// Teacher log-probs [n, V]: a peaked random distribution; with `zeros`, row 1 has some tokens at
// probability 0 (-inf) and row 2 keeps only two tokens. Normalised in f64, then cast.
Tensor teacher_logp(int64_t n, int64_t V, uint32_t seed, DType dt, bool zeros) {
  Tensor z = random_tensor({n, V}, seed, -3.0, 3.0);
  double* p = z.data<double>();
  if (zeros) {
    if (n > 1)
      for (int64_t v = 0; v < V; v += 3) p[1 * V + v] = -kInf;
    if (n > 2)
      for (int64_t v = 2; v < V; ++v) p[2 * V + v] = -kInf;
  }
  for (int64_t i = 0; i < n; ++i) {
    double mx = -kInf, s = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, p[i * V + v]);
    for (int64_t v = 0; v < V; ++v) s += std::exp(p[i * V + v] - mx);
    for (int64_t v = 0; v < V; ++v) p[i * V + v] -= mx + std::log(s);
  }
  return z.to(dt);
}

// Naive per-row divergence straight from the definitions (full sort for the top-K).
double ref_divergence(const std::vector<double>& a, const std::vector<double>& s, const DivergenceSpec& sp) {
  const size_t V = a.size();
  double Z = 0;
  for (double x : s) Z += std::exp(x);
  std::vector<double> u(V), lu(V), t(V);
  for (size_t v = 0; v < V; ++v) {
    u[v] = std::exp(s[v]) / Z;
    lu[v] = std::log(u[v]);
    t[v] = std::exp(a[v]);
  }
  double fwd = 0, rev = 0, jsd = 0, topk = 0;
  const double al = sp.jsd_alpha;
  for (size_t v = 0; v < V; ++v) {
    const double m = al * t[v] + (1 - al) * u[v];
    jsd += (1 - al) * u[v] * (lu[v] - std::log(m));
    if (t[v] == 0) continue;
    fwd += t[v] * (a[v] - lu[v]);
    rev += u[v] * (lu[v] - a[v]);
    jsd += al * t[v] * (a[v] - std::log(m));
  }
  std::vector<size_t> idx(V);
  std::iota(idx.begin(), idx.end(), size_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](size_t i, size_t j) { return a[i] > a[j]; });
  for (int64_t k = 0; k < std::min<int64_t>(sp.topk, static_cast<int64_t>(V)); ++k)
    if (t[idx[k]] > 0) topk += t[idx[k]] * (a[idx[k]] - lu[idx[k]]);
  switch (sp.kind) {
    case Divergence::forward_kl: return fwd;
    case Divergence::reverse_kl: return rev;
    case Divergence::mixture: return (1 - sp.reverse_weight) * fwd + sp.reverse_weight * rev;
    case Divergence::jsd: return jsd;
    case Divergence::topk_forward_kl: return topk;
  }
  return NAN;
}

std::string spec_str(const DivergenceSpec& s) {
  std::string r = divergence_name(s.kind);
  if (s.kind == Divergence::mixture) r += " w=" + std::to_string(s.reverse_weight);
  if (s.kind == Divergence::jsd) r += " alpha=" + std::to_string(s.jsd_alpha);
  if (s.kind == Divergence::topk_forward_kl) r += " K=" + std::to_string(s.topk);
  return r;
}

DivergenceSpec spec(Divergence k, double w = 0, double alpha = 0.5, int64_t K = 16) {
  DivergenceSpec s;
  s.kind = k;
  s.reverse_weight = w;
  s.jsd_alpha = alpha;
  s.topk = K;
  return s;
}

// Every kind with several (w, alpha, K), for V = 9 (K = 9 is the full vocabulary).
std::vector<DivergenceSpec> all_specs(int64_t V) {
  return {spec(Divergence::forward_kl),        spec(Divergence::reverse_kl),
          spec(Divergence::mixture, 0.0),      spec(Divergence::mixture, 0.3),
          spec(Divergence::mixture, 1.0),      spec(Divergence::jsd, 0, 0.5),
          spec(Divergence::jsd, 0, 0.1),       spec(Divergence::jsd, 0, 0.9),
          spec(Divergence::topk_forward_kl, 0, 0.5, 1), spec(Divergence::topk_forward_kl, 0, 0.5, 3),
          spec(Divergence::topk_forward_kl, 0, 0.5, V)};
}

}  // namespace

// ---- log-softmax ---------------------------------------------------------------------------------

TEST(Softmax, ForwardMatchesDefinitionAndIsStable) {
  Tensor x = random_tensor({3, 7}, 11, -4, 4);
  x.data<double>()[2 * 7 + 0] = 1000.0;  // exp would overflow without the max shift
  x.data<double>()[2 * 7 + 1] = 999.0;
  Tensor y = log_softmax_forward(x);
  Tensor lse = logsumexp_rows(x);
  for (int64_t i = 0; i < 3; ++i) {
    double s = 0;
    for (int64_t v = 0; v < 7; ++v) s += std::exp(y.item(i * 7 + v));
    EXPECT_NEAR(s, 1.0, 1e-13);
    EXPECT_NEAR(y.item(i * 7 + 3), x.item(i * 7 + 3) - lse.item(i), 1e-12);
  }
  double z = 0;
  for (int64_t v = 0; v < 7; ++v) z += std::exp(x.item(v));
  EXPECT_NEAR(lse.item(0), std::log(z), 1e-13);
  EXPECT_NEAR(y.item(14), -std::log1p(std::exp(-1.0)), 1e-12);
  EXPECT_TRUE(all_finite(log_softmax_forward(x.to(DType::f32))));
}

TEST(Softmax, BackwardFiniteDifferences) {
  for (DType dt : kFloatTypes) {
    Tensor x = random_tensor({4, 9}, 12, -3, 3, dt);
    Tensor dy = random_tensor({4, 9}, 13, -1, 1, dt);
    Tensor dx = log_softmax_backward(log_softmax_forward(x), dy);
    EXPECT_LE(fd_err([&] { return log_softmax_forward(x); }, x, dx, dy, "log_softmax"), fd_tol(dt));
  }
}

TEST(Softmax, BadInputs) {
  EXPECT_ERROR_HAS(log_softmax_forward(Tensor({5})), "'x'", "1 dimensions, expected 2");
  EXPECT_ERROR_HAS(log_softmax_forward(Tensor({2, 3}, DType::bf16)), "'x'", "unsupported dtype bf16");
  EXPECT_ERROR_HAS(log_softmax_forward(Tensor({2, 3}, DType::i32)), "'x'", "unsupported dtype i32");
  EXPECT_ERROR_HAS(log_softmax_forward(Tensor({2, 0})), "'x'", "dimension 1");
  EXPECT_ERROR_HAS(log_softmax_backward(Tensor({2, 3}), Tensor({2, 4})), "'dy'", "dimension 1 is 4, expected 3");
  EXPECT_ERROR_HAS(log_softmax_backward(Tensor({2, 3}), Tensor({2, 3}, DType::f64)), "'dy'", "dtype");
}

// ---- cross-entropy -------------------------------------------------------------------------------

TEST(CrossEntropy, ForwardValuesWeightsAndIgnore) {
  Tensor z = random_tensor({4, 6}, 21, -2, 2);
  Tensor t = Tensor::from_vector(std::vector<int32_t>{2, kIgnoreIndex, 0, 5}, {4});
  Tensor w = Tensor::from_vector(std::vector<double>{0.5, 2.0, 1.0, 3.0}, {4});
  Tensor lse;
  Tensor loss = cross_entropy_forward(z, t, w, &lse);
  Tensor y = log_softmax_forward(z);
  EXPECT_NEAR(loss.item(0), -0.5 * y.item(0 * 6 + 2), 1e-14);
  EXPECT_EQ(loss.item(1), 0.0);
  EXPECT_NEAR(loss.item(2), -1.0 * y.item(2 * 6 + 0), 1e-14);
  EXPECT_NEAR(loss.item(3), -3.0 * y.item(3 * 6 + 5), 1e-14);
  EXPECT_NEAR(lse.item(3), logsumexp_rows(z).item(3), 1e-15);
  // No weight = all ones; ignored rows get zero loss and an exactly zero gradient.
  Tensor l1 = cross_entropy_forward(z, t, Tensor(), nullptr);
  EXPECT_NEAR(l1.item(3), -y.item(3 * 6 + 5), 1e-14);
  Tensor dz = cross_entropy_backward(z, t, Tensor(), lse, Tensor::full({4}, 1.0, DType::f64));
  for (int64_t v = 0; v < 6; ++v) EXPECT_EQ(dz.item(1 * 6 + v), 0.0);
  // A custom ignore_index: rows whose target equals it are skipped even if it is a valid class,
  // and -100 is then an out-of-range target like any other.
  EXPECT_ERROR_HAS(cross_entropy_forward(z, t, w, nullptr, 0), "'targets'", "row 1", "value -100");
  t.data<int32_t>()[1] = 0;
  Tensor l2 = cross_entropy_forward(z, t, w, nullptr, 0);
  EXPECT_EQ(l2.item(1), 0.0);
  EXPECT_EQ(l2.item(2), 0.0);
  EXPECT_NEAR(l2.item(0), loss.item(0), 1e-15);
}

TEST(CrossEntropy, BackwardFiniteDifferences) {
  for (DType dt : kFloatTypes) {
    const int64_t n = 7, V = 8;
    Tensor z = random_tensor({n, V}, 22, -3, 3, dt);
    Tensor t = random_ids({n}, 23, static_cast<int32_t>(V));
    t.data<int32_t>()[1] = kIgnoreIndex;
    t.data<int32_t>()[4] = kIgnoreIndex;
    Tensor w = random_tensor({n}, 24, 0.2, 3.0, dt);
    Tensor r = random_tensor({n}, 25, -1, 1, dt);
    for (bool weighted : {true, false}) {
      const Tensor wt = weighted ? w : Tensor();
      Tensor lse;
      cross_entropy_forward(z, t, wt, &lse);
      Tensor dz = cross_entropy_backward(z, t, wt, lse, r);
      EXPECT_LE(fd_err([&] { return cross_entropy_forward(z, t, wt, nullptr); }, z, dz, r,
                       weighted ? "cross_entropy weighted+ignore" : "cross_entropy ignore"),
                fd_tol(dt));
    }
    // ignore_index = 3 (a real class id): same check with the other ignore rule.
    t.data<int32_t>()[1] = 3;
    t.data<int32_t>()[4] = 6;
    Tensor lse;
    cross_entropy_forward(z, t, w, &lse, 3);
    Tensor dz = cross_entropy_backward(z, t, w, lse, r, 3);
    EXPECT_LE(fd_err([&] { return cross_entropy_forward(z, t, w, nullptr, 3); }, z, dz, r, "cross_entropy ignore=3"),
              fd_tol(dt));
  }
}

TEST(CrossEntropy, BadInputs) {
  Tensor z({3, 5}), w({3}), lse({3}), g({3});
  Tensor t = Tensor::from_vector(std::vector<int32_t>{0, 4, 5}, {3});
  EXPECT_ERROR_HAS(cross_entropy_forward(z, t, w, nullptr), "'targets'", "row 2", "value 5", "[0, 5)");
  t.data<int32_t>()[2] = -1;
  EXPECT_ERROR_HAS(cross_entropy_forward(z, t, Tensor(), nullptr), "'targets'", "row 2", "value -1");
  EXPECT_ERROR_HAS(cross_entropy_backward(z, t, w, lse, g), "'targets'", "row 2", "value -1");
  t.data<int32_t>()[2] = 1;
  EXPECT_ERROR_HAS(cross_entropy_forward(z, Tensor({3}), w, nullptr), "'targets'", "unsupported dtype f32");
  EXPECT_ERROR_HAS(cross_entropy_forward(z, Tensor({4}, DType::i32), w, nullptr), "'targets'",
                   "dimension 0 is 4, expected 3");
  EXPECT_ERROR_HAS(cross_entropy_forward(z, t, Tensor({4}), nullptr), "'weight'", "dimension 0 is 4, expected 3");
  EXPECT_ERROR_HAS(cross_entropy_forward(z, t, Tensor({3}, DType::f64), nullptr), "'weight'", "dtype");
  EXPECT_ERROR_HAS(cross_entropy_forward(Tensor({3, 5}, DType::bf16), t, Tensor(), nullptr), "'logits'",
                   "unsupported dtype bf16");
  EXPECT_ERROR_HAS(cross_entropy_forward(Tensor({3, 5}, DType::i32), t, Tensor(), nullptr), "'logits'",
                   "unsupported dtype i32");
  EXPECT_ERROR_HAS(cross_entropy_forward(Tensor({15}), t, Tensor(), nullptr), "'logits'", "expected 2");
  EXPECT_ERROR_HAS(cross_entropy_backward(z, t, w, Tensor({2}), g), "'lse'", "dimension 0 is 2, expected 3");
  EXPECT_ERROR_HAS(cross_entropy_backward(z, t, w, lse, Tensor({3, 1})), "'dloss'", "dimensions, expected 1");
}

// ---- KL family -----------------------------------------------------------------------------------

TEST(Divergence, ForwardMatchesDefinition) {
  for (int64_t V : {9, 300}) {
    const int64_t n = 4;
    Tensor tl = teacher_logp(n, V, 31, DType::f64, true);
    Tensor s = random_tensor({n, V}, 32, -3, 3);
    std::vector<DivergenceSpec> specs = all_specs(V);
    specs.push_back(spec(Divergence::topk_forward_kl, 0, 0.5, 16 % V));
    for (const DivergenceSpec& sp : specs) {
      Tensor lse;
      Tensor D = divergence_forward(tl, s, sp, &lse);
      ASSERT_EQ(D.shape(), (Shape{n}));
      for (int64_t i = 0; i < n; ++i) {
        const double ref = ref_divergence(row_of(tl, i), row_of(s, i), sp);
        EXPECT_NEAR(D.item(i), ref, 1e-12 * std::max(1.0, std::fabs(ref))) << spec_str(sp) << " V=" << V << " row " << i;
        EXPECT_NEAR(lse.item(i), logsumexp_rows(s).item(i), 1e-13);
      }
      // f32 storage: same values to f32 accuracy.
      Tensor D32 = divergence_forward(tl.to(DType::f32), s.to(DType::f32), sp, nullptr);
      EXPECT_LE(max_rel_err(D32, D), 1e-5) << spec_str(sp);
    }
  }
}

TEST(Divergence, BackwardFiniteDifferences) {
  const int64_t n = 4, V = 9;
  for (DType dt : kFloatTypes) {
    Tensor tl = teacher_logp(n, V, 33, dt, true);  // rows 1 and 2 hold -inf entries
    Tensor s = random_tensor({n, V}, 34, -2, 2, dt);
    Tensor r = random_tensor({n}, 35, -1, 1, dt);
    for (const DivergenceSpec& sp : all_specs(V)) {
      Tensor lse;
      Tensor D = divergence_forward(tl, s, sp, &lse);
      Tensor ds = divergence_backward(tl, s, lse, r, sp);
      ASSERT_TRUE(all_finite(D) && all_finite(ds)) << spec_str(sp);
      EXPECT_LE(fd_err([&] { return divergence_forward(tl, s, sp, nullptr); }, s, ds, r, spec_str(sp)), fd_tol(dt));
    }
  }
}

TEST(Divergence, SpecialCasesAgree) {
  const int64_t n = 5, V = 11;
  Tensor tl = teacher_logp(n, V, 36, DType::f64, true);
  Tensor s = random_tensor({n, V}, 37, -2, 2);
  Tensor r = random_tensor({n}, 38, -1, 1);
  auto run = [&](const DivergenceSpec& sp, Tensor& ds) {
    Tensor lse;
    Tensor D = divergence_forward(tl, s, sp, &lse);
    ds = divergence_backward(tl, s, lse, r, sp);
    return D;
  };
  Tensor gf, gr, g0, g1, gk;
  Tensor fwd = run(spec(Divergence::forward_kl), gf), rev = run(spec(Divergence::reverse_kl), gr);
  // mixture at w = 0 / 1 is exactly forward / reverse; top-K with K = V is the full forward KL.
  Tensor m0 = run(spec(Divergence::mixture, 0.0), g0), m1 = run(spec(Divergence::mixture, 1.0), g1);
  Tensor kV = run(spec(Divergence::topk_forward_kl, 0, 0.5, V), gk);
  EXPECT_LE(max_abs_err(m0, fwd), 1e-15);
  EXPECT_LE(max_abs_err(g0, gf), 1e-15);
  EXPECT_LE(max_abs_err(m1, rev), 1e-15);
  EXPECT_LE(max_abs_err(g1, gr), 1e-15);
  EXPECT_LE(max_abs_err(kV, fwd), 1e-14);
  EXPECT_LE(max_abs_err(gk, gf), 1e-15);
  // Identical distributions: every divergence (but a partial top-K) is 0 with a 0 gradient.
  Tensor tf = teacher_logp(n, V, 39, DType::f64, false);
  Tensor same = tf.clone();
  for (int64_t i = 0; i < same.numel(); ++i) same.data<double>()[i] += 2.5;  // logits up to a shift
  for (const DivergenceSpec& sp : all_specs(V)) {
    if (sp.kind == Divergence::topk_forward_kl && sp.topk < V) continue;
    Tensor lse;
    Tensor D = divergence_forward(tf, same, sp, &lse);
    Tensor ds = divergence_backward(tf, same, lse, r, sp);
    EXPECT_LE(max_abs_err(D, Tensor::zeros({n}, DType::f64)), 1e-14) << spec_str(sp);
    EXPECT_LE(max_abs_err(ds, Tensor::zeros({n, V}, DType::f64)), 1e-14) << spec_str(sp);
  }
}

TEST(Divergence, ZeroProbabilityTeacherIsNaNFree) {
  // Extreme student logits and teachers that are one-hot or have -inf holes: no NaN anywhere.
  const int64_t n = 3, V = 6;
  Tensor tl = Tensor::full({n, V}, -kInf, DType::f64);
  tl.data<double>()[0 * V + 2] = 0.0;  // one-hot
  tl.data<double>()[1 * V + 0] = std::log(0.25);
  tl.data<double>()[1 * V + 5] = std::log(0.75);
  for (int64_t v = 0; v < V; ++v) tl.data<double>()[2 * V + v] = -std::log(double(V));
  Tensor s = Tensor::from_vector(std::vector<double>{30, -30, -30, 0, 1, 2, -40, 40, 0, 0, 0, 0, 700, -700, 0, 1, 2, 3}, {n, V});
  Tensor r = Tensor::full({n}, 1.0, DType::f64);
  for (DType dt : kFloatTypes)
    for (const DivergenceSpec& sp : all_specs(V)) {
      Tensor a = tl.to(dt), x = s.to(dt), lse;
      Tensor D = divergence_forward(a, x, sp, &lse);
      Tensor ds = divergence_backward(a, x, lse, r.to(dt), sp);
      EXPECT_TRUE(all_finite(D)) << spec_str(sp) << " " << dtype_name(dt);
      EXPECT_TRUE(all_finite(ds)) << spec_str(sp) << " " << dtype_name(dt);
    }
  // Reverse KL sums over the teacher's support only (documented restriction), row 1: tokens 0 and 5.
  Tensor D = divergence_forward(tl, s, spec(Divergence::reverse_kl), nullptr);
  EXPECT_NEAR(D.item(1), ref_divergence(row_of(tl, 1), row_of(s, 1), spec(Divergence::reverse_kl)), 1e-12);
}

TEST(Divergence, TopKTiesGoToLowerIndex) {
  // Probabilities 0.3, 0.2, 0.2, 0.2, 0.1: with K = 2 the tie among tokens 1..3 goes to token 1.
  const int64_t V = 5;
  Tensor tl = Tensor::from_vector(
      std::vector<double>{std::log(0.3), std::log(0.2), std::log(0.2), std::log(0.2), std::log(0.1)}, {1, V});
  Tensor s = Tensor::from_vector(std::vector<double>{0.1, -0.4, 0.7, 0.2, -1.0}, {1, V});
  Tensor lse;
  const DivergenceSpec sp = spec(Divergence::topk_forward_kl, 0, 0.5, 2);
  Tensor D = divergence_forward(tl, s, sp, &lse);
  const double e = lse.item(0);
  const double want = 0.3 * (std::log(0.3) - (0.1 - e)) + 0.2 * (std::log(0.2) - (-0.4 - e));
  EXPECT_NEAR(D.item(0), want, 1e-14);
  // Gradient: -t_j on the selected tokens only, plus u_j * (0.3 + 0.2) everywhere.
  Tensor ds = divergence_backward(tl, s, lse, Tensor::full({1}, 1.0, DType::f64), sp);
  for (int64_t v = 0; v < V; ++v) {
    const double sel = v == 0 ? 0.3 : v == 1 ? 0.2 : 0.0;
    EXPECT_NEAR(ds.item(v), std::exp(s.item(v) - e) * 0.5 - sel, 1e-14) << v;
  }
  // A uniform teacher over a large vocabulary: K = 10 picks exactly tokens 0..9.
  const int64_t W = 1000, K = 10;
  Tensor tu = Tensor::full({1, W}, -std::log(double(W)), DType::f64);
  Tensor su = random_tensor({1, W}, 40, -1, 1);
  Tensor lu;
  divergence_forward(tu, su, spec(Divergence::topk_forward_kl, 0, 0.5, K), &lu);
  Tensor dsu = divergence_backward(tu, su, lu, Tensor::full({1}, 1.0, DType::f64),
                                   spec(Divergence::topk_forward_kl, 0, 0.5, K));
  for (int64_t v = 0; v < W; ++v) {
    const double u = std::exp(su.item(v) - lu.item(0));
    EXPECT_NEAR(dsu.item(v) - u * K / double(W), v < K ? -1.0 / W : 0.0, 1e-15) << v;
  }
}

TEST(Divergence, ParseAndName) {
  for (Divergence d : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::mixture, Divergence::jsd,
                       Divergence::topk_forward_kl})
    EXPECT_EQ(parse_divergence(divergence_name(d)), d);
  EXPECT_ERROR_HAS(parse_divergence("kl"), "'kl'", "forward_kl");
}

TEST(Divergence, BadInputs) {
  Tensor t({4, 9}), s({4, 9}), lse({4}), g({4});
  const DivergenceSpec fk = spec(Divergence::forward_kl);
  EXPECT_ERROR_HAS(divergence_forward(Tensor({4, 8}), s, fk, nullptr), "'teacher_logp'", "dimension 1 is 8, expected 9");
  EXPECT_ERROR_HAS(divergence_forward(Tensor({3, 9}), s, fk, nullptr), "'teacher_logp'", "dimension 0 is 3, expected 4");
  EXPECT_ERROR_HAS(divergence_forward(t, Tensor({36}), fk, nullptr), "'student_logits'", "1 dimensions, expected 2");
  EXPECT_ERROR_HAS(divergence_forward(t, Tensor({4, 9}, DType::bf16), fk, nullptr), "'student_logits'",
                   "unsupported dtype bf16");
  EXPECT_ERROR_HAS(divergence_forward(t, Tensor({4, 9}, DType::i32), fk, nullptr), "'student_logits'",
                   "unsupported dtype i32");
  EXPECT_ERROR_HAS(divergence_forward(Tensor({4, 9}, DType::bf16), s, fk, nullptr), "'teacher_logp'",
                   "unsupported dtype bf16");
  EXPECT_ERROR_HAS(divergence_forward(Tensor({4, 9}, DType::f64), s, fk, nullptr), "'teacher_logp'", "dtype");
  EXPECT_ERROR_HAS(divergence_forward(Tensor({4, 0}), Tensor({4, 0}), fk, nullptr), "'student_logits'", "dimension 1");
  for (int64_t K : {int64_t{0}, int64_t{-1}, int64_t{10}}) {
    // A named string: the macro keeps the char pointers past the full expression (ASan found the
    // temporary's c_str() used after its end).
    const std::string topk_is = "'topk' is " + std::to_string(K);
    EXPECT_ERROR_HAS(divergence_forward(t, s, spec(Divergence::topk_forward_kl, 0, 0.5, K), nullptr), topk_is.c_str(),
                     "[1, 9]", "dimension 1 of 'student_logits'");
  }
  for (double a : {0.0, 1.0, -0.5, 1.5, double(NAN)})
    EXPECT_ERROR_HAS(divergence_forward(t, s, spec(Divergence::jsd, 0, a), nullptr), "'jsd_alpha'", "(0, 1)");
  for (double w : {-0.1, 1.1})
    EXPECT_ERROR_HAS(divergence_backward(t, s, lse, g, spec(Divergence::mixture, w)), "'reverse_weight'", "[0, 1]");
  EXPECT_ERROR_HAS(divergence_backward(t, s, Tensor({3}), g, fk), "'student_lse'", "dimension 0 is 3, expected 4");
  EXPECT_ERROR_HAS(divergence_backward(t, s, lse, Tensor({4, 1}), fk), "'dloss'", "dimensions, expected 1");
  EXPECT_ERROR_HAS(divergence_backward(t, s, lse, Tensor({4}, DType::f64), fk), "'dloss'", "dtype");
  // Parameters of other kinds are not looked at.
  EXPECT_NO_THROW(divergence_forward(t, s, spec(Divergence::forward_kl, 7.0, 3.0, 0), nullptr));
}
