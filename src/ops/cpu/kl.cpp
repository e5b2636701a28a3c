// CPU divergence family (forward/reverse KL, mixture, JSD, top-K forward KL) between teacher
// log-probs and student logits; double accumulators, OpenMP over rows.
#include "opdlm/ops/kl.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "opdlm/ops/softmax.hpp"

namespace opdlm::ops {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// All checks happen before the OpenMP regions: exceptions must not escape them.
void check_inputs(const char* op, const Tensor& teacher, const Tensor& student, const DivergenceSpec& spec) {
  expect_float_cpu(student, "student_logits");
  expect_ndim(student, "student_logits", 2);
  expect_float_cpu(teacher, "teacher_logp");
  expect_same_dtype(student, "student_logits", teacher, "teacher_logp");
  expect_shape(teacher, "teacher_logp", student.shape(), "shape of 'student_logits'");
  const int64_t V = student.size(1);
  if (V < 1) OPDLM_FAIL(op, ": tensor 'student_logits' ", student.describe(), " dimension 1 (vocabulary) is 0, expected >= 1");
  switch (spec.kind) {
    case Divergence::forward_kl:
    case Divergence::reverse_kl: break;
    case Divergence::mixture:
      if (!(spec.reverse_weight >= 0.0 && spec.reverse_weight <= 1.0))
        OPDLM_FAIL(op, ": 'reverse_weight' is ", spec.reverse_weight, ", must be in [0, 1]");
      break;
    case Divergence::jsd:
      if (!(spec.jsd_alpha > 0.0 && spec.jsd_alpha < 1.0))
        OPDLM_FAIL(op, ": 'jsd_alpha' is ", spec.jsd_alpha, ", must be in (0, 1) (both ends excluded)");
      break;
    case Divergence::topk_forward_kl:
      if (spec.topk < 1 || spec.topk > V)
        OPDLM_FAIL(op, ": 'topk' is ", spec.topk, ", must be in [1, ", V,
                   "] (the vocabulary, dimension 1 of 'student_logits')");
      break;
    default: OPDLM_FAIL(op, ": unknown divergence kind ", static_cast<int>(spec.kind));
  }
}

double logaddexp(double x, double y) {
  if (x == kNegInf) return y;
  if (y == kNegInf) return x;
  return std::max(x, y) + std::log1p(std::exp(-std::fabs(x - y)));
}

// Per-token terms: value, and dl = d(term)/d(student log-prob l). a = log t (may be -inf).
// t (log t - l); tokens the teacher excludes count 0.
inline double fwd_term(double a, double l, double& dl) {
  if (a == kNegInf) return dl = 0.0;
  const double t = std::exp(a);
  dl = -t;
  return t * (a - l);
}
// u (l - log t) over the teacher's support (see kl.hpp); u = 0 counts 0, so underflow cannot make 0 * inf.
inline double rev_term(double a, double l, double& dl) {
  if (a == kNegInf || l == kNegInf) return dl = 0.0;
  const double u = std::exp(l);
  dl = u * (l - a + 1.0);
  return u * (l - a);
}
// alpha t (log t - lm) + (1 - alpha) u (l - lm), lm = log(alpha t + (1 - alpha) u). In dl the terms
// through lm cancel (alpha t + (1 - alpha) u = m), leaving (1 - alpha) u (l - lm).
inline double jsd_term(double a, double l, double alpha, double log_a, double log_1ma, double& dl) {
  const double lm = logaddexp(a + log_a, l + log_1ma);
  double val = 0.0;
  dl = 0.0;
  if (a != kNegInf) val += alpha * std::exp(a) * (a - lm);
  if (l != kNegInf) {
    const double r = (1.0 - alpha) * std::exp(l) * (l - lm);
    val += r;
    dl = r;
  }
  return val;
}

// Indices of the K largest teacher log-probs; the total order (value desc, index asc) makes ties go
// to the lower index and keeps nth_element well defined (NaN sorts as -inf).
template <class T>
void topk_indices(const T* a, int64_t V, int64_t K, std::vector<int64_t>& idx) {
  idx.resize(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), int64_t{0});
  auto key = [a](int64_t i) {
    const double x = a[i];
    return std::isnan(x) ? kNegInf : x;
  };
  if (K < V)
    std::nth_element(idx.begin(), idx.begin() + K, idx.end(), [&](int64_t i, int64_t j) {
      const double ki = key(i), kj = key(j);
      return ki > kj || (ki == kj && i < j);
    });
  idx.resize(static_cast<size_t>(K));
}

// D for one row; when g is non-null it also gets g[v] = dD/dl_v for every v.
template <class T>
double row_divergence(const T* a, const T* s, double lse, int64_t V, const DivergenceSpec& spec,
                      std::vector<int64_t>& idx, double* g) {
  auto l = [&](int64_t v) { return static_cast<double>(s[v]) - lse; };
  double D = 0.0, dl = 0.0;
  switch (spec.kind) {
    case Divergence::forward_kl:
      for (int64_t v = 0; v < V; ++v) {
        D += fwd_term(a[v], l(v), dl);
        if (g) g[v] = dl;
      }
      break;
    case Divergence::reverse_kl:
      for (int64_t v = 0; v < V; ++v) {
        D += rev_term(a[v], l(v), dl);
        if (g) g[v] = dl;
      }
      break;
    case Divergence::mixture: {
      const double w = spec.reverse_weight;
      double dr = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        const double lv = l(v);
        D += (1.0 - w) * fwd_term(a[v], lv, dl) + w * rev_term(a[v], lv, dr);
        if (g) g[v] = (1.0 - w) * dl + w * dr;
      }
      break;
    }
    case Divergence::jsd: {
      const double al = spec.jsd_alpha, log_a = std::log(al), log_1ma = std::log1p(-al);
      for (int64_t v = 0; v < V; ++v) {
        D += jsd_term(a[v], l(v), al, log_a, log_1ma, dl);
        if (g) g[v] = dl;
      }
      break;
    }
    case Divergence::topk_forward_kl:
      topk_indices(a, V, spec.topk, idx);
      if (g) std::fill(g, g + V, 0.0);
      for (int64_t v : idx) {
        D += fwd_term(a[v], l(v), dl);
        if (g) g[v] = dl;
      }
      break;
  }
  return D;
}

template <class T>
void forward_kernel(const Tensor& teacher, const Tensor& student, const DivergenceSpec& spec, Tensor& D,
                    Tensor& lse) {
  const int64_t n = student.size(0), V = student.size(1);
  const T* pa = teacher.data<T>();
  const T* ps = student.data<T>();
  T* pD = D.data<T>();
  T* pe = lse.data<T>();
#pragma omp parallel
  {
    std::vector<int64_t> idx;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      // Round lse to the storage dtype first so forward and backward see the same log-probs.
      const T e = static_cast<T>(detail::row_logsumexp(ps + i * V, V));
      pe[i] = e;
      pD[i] = static_cast<T>(row_divergence(pa + i * V, ps + i * V, static_cast<double>(e), V, spec, idx, nullptr));
    }
  }
}

template <class T>
void backward_kernel(const Tensor& teacher, const Tensor& student, const Tensor& lse, const Tensor& dloss,
                     const DivergenceSpec& spec, Tensor& ds) {
  const int64_t n = student.size(0), V = student.size(1);
  const T* pa = teacher.data<T>();
  const T* ps = student.data<T>();
  const T* pe = lse.data<T>();
  const T* pg = dloss.data<T>();
  T* pd = ds.data<T>();
#pragma omp parallel
  {
    std::vector<int64_t> idx;
    std::vector<double> g(static_cast<size_t>(V));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const T* s = ps + i * V;
      const double e = pe[i];
      row_divergence(pa + i * V, s, e, V, spec, idx, g.data());
      // Through l = s - lse(s): dD/ds_j = g_j - u_j * sum_k g_k.
      double G = 0.0;
      for (int64_t v = 0; v < V; ++v) G += g[v];
      const double c = pg[i];
      for (int64_t v = 0; v < V; ++v)
        pd[i * V + v] = static_cast<T>(c * (g[v] - std::exp(static_cast<double>(s[v]) - e) * G));
    }
  }
}

}  // namespace

const char* divergence_name(Divergence d) {
  switch (d) {
    case Divergence::forward_kl: return "forward_kl";
    case Divergence::reverse_kl: return "reverse_kl";
    case Divergence::mixture: return "mixture";
    case Divergence::jsd: return "jsd";
    case Divergence::topk_forward_kl: return "topk_forward_kl";
  }
  return "?";
}

Divergence parse_divergence(const std::string& name) {
  for (Divergence d : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::mixture, Divergence::jsd,
                       Divergence::topk_forward_kl})
    if (name == divergence_name(d)) return d;
  OPDLM_FAIL("unknown divergence '", name, "'; expected forward_kl, reverse_kl, mixture, jsd or topk_forward_kl");
}

Tensor divergence_forward(const Tensor& teacher_logp, const Tensor& student_logits, const DivergenceSpec& spec,
                          Tensor* student_lse) {
  check_inputs("divergence_forward", teacher_logp, student_logits, spec);
  const int64_t n = student_logits.size(0);
  Tensor D = Tensor::empty({n}, student_logits.dtype());
  Tensor lse = Tensor::empty({n}, student_logits.dtype());
  if (student_logits.dtype() == DType::f32) forward_kernel<float>(teacher_logp, student_logits, spec, D, lse);
  else forward_kernel<double>(teacher_logp, student_logits, spec, D, lse);
  if (student_lse) *student_lse = lse;
  return D;
}

Tensor divergence_backward(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& student_lse,
                           const Tensor& dloss, const DivergenceSpec& spec) {
  check_inputs("divergence_backward", teacher_logp, student_logits, spec);
  const int64_t n = student_logits.size(0);
  expect_float_cpu(student_lse, "student_lse");
  expect_same_dtype(student_logits, "student_logits", student_lse, "student_lse");
  expect_shape(student_lse, "student_lse", {n}, "rows of 'student_logits'");
  expect_float_cpu(dloss, "dloss");
  expect_same_dtype(student_logits, "student_logits", dloss, "dloss");
  expect_shape(dloss, "dloss", {n}, "rows of 'student_logits'");
  Tensor ds = Tensor::empty(student_logits.shape(), student_logits.dtype());
  if (student_logits.dtype() == DType::f32)
    backward_kernel<float>(teacher_logp, student_logits, student_lse, dloss, spec, ds);
  else
    backward_kernel<double>(teacher_logp, student_logits, student_lse, dloss, spec, ds);
  return ds;
}

}  // namespace opdlm::ops
