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

// D for one row; when g is non-null it also gets g[v] = dD/dl_v for every v. keep (top-K only, may
// be null): the row's top-K membership chosen by the caller (a vocabulary slice of a global top-K).
template <class T>
double row_divergence(const T* a, const T* s, double lse, int64_t V, const DivergenceSpec& spec,
                      std::vector<int64_t>& idx, double* g, const uint8_t* keep = nullptr) {
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
      if (keep) {
        idx.clear();
        for (int64_t v = 0; v < V; ++v)
          if (keep[v]) idx.push_back(v);
      } else {
        topk_indices(a, V, spec.topk, idx);
      }
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

template <class T>
void slice_kernel(const Tensor& teacher, const Tensor& student, const Tensor& lse, const DivergenceSpec& spec,
                  const uint8_t* keep, Tensor& D, Tensor* g) {
  const int64_t n = student.size(0), V = student.size(1);
  const T* pa = teacher.data<T>();
  const T* ps = student.data<T>();
  const T* pe = lse.data<T>();
  double* pD = D.data<double>();
  double* pg = g ? g->data<double>() : nullptr;
#pragma omp parallel
  {
    std::vector<int64_t> idx;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      pD[i] = row_divergence(pa + i * V, ps + i * V, static_cast<double>(pe[i]), V, spec, idx, pg ? pg + i * V : nullptr,
                             keep ? keep + i * V : nullptr);
  }
}

}  // namespace

Tensor divergence_slice(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& lse,
                        const DivergenceSpec& spec, const std::vector<uint8_t>* keep, Tensor* g) {
  DivergenceSpec checked = spec;
  if (checked.kind == Divergence::topk_forward_kl) checked.topk = 1;  // K is checked against the whole vocabulary
  check_inputs("divergence_slice", teacher_logp, student_logits, checked);
  const int64_t n = student_logits.size(0), V = student_logits.size(1);
  expect_same_dtype(student_logits, "student_logits", lse, "lse");
  expect_shape(lse, "lse", {n}, "rows of 'student_logits'");
  if (spec.kind == Divergence::topk_forward_kl && (!keep || static_cast<int64_t>(keep->size()) != n * V))
    OPDLM_FAIL("divergence_slice: top-K needs 'keep' with ", n * V, " entries (rows x slice)");
  Tensor D = Tensor::zeros({n}, DType::f64);
  if (g) *g = Tensor::empty({n, V}, DType::f64);
  const uint8_t* k = spec.kind == Divergence::topk_forward_kl ? keep->data() : nullptr;
  if (student_logits.dtype() == DType::f32) slice_kernel<float>(teacher_logp, student_logits, lse, spec, k, D, g);
  else slice_kernel<double>(teacher_logp, student_logits, lse, spec, k, D, g);
  return D;
}

namespace {
template <class T>
void topk_kernel(const Tensor& teacher, int64_t K, std::vector<double>& out) {
  const int64_t n = teacher.size(0), V = teacher.size(1);
  const T* pa = teacher.data<T>();
  out.assign(size_t(n * K * 2), 0.0);
#pragma omp parallel
  {
    std::vector<int64_t> idx;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = std::min(K, V);
      topk_indices(pa + i * V, V, k, idx);
      // Sorted (value desc, index asc) so the caller can merge; missing entries are (-inf, -1).
      std::sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) {
        const double a = std::isnan(double(pa[i * V + x])) ? kNegInf : double(pa[i * V + x]);
        const double b = std::isnan(double(pa[i * V + y])) ? kNegInf : double(pa[i * V + y]);
        return a > b || (a == b && x < y);
      });
      for (int64_t j = 0; j < K; ++j) {
        double* o = out.data() + (i * K + j) * 2;
        if (j < k) {
          const double a = pa[i * V + idx[size_t(j)]];
          o[0] = std::isnan(a) ? kNegInf : a;
          o[1] = static_cast<double>(idx[size_t(j)]);
        } else {
          o[0] = kNegInf;
          o[1] = -1.0;
        }
      }
    }
  }
}
}  // namespace

std::vector<double> topk_candidates(const Tensor& teacher_logp, int64_t K) {
  expect_float_cpu(teacher_logp, "teacher_logp");
  expect_ndim(teacher_logp, "teacher_logp", 2);
  OPDLM_CHECK(K >= 1, "topk_candidates: K ", K);
  std::vector<double> out;
  if (teacher_logp.dtype() == DType::f32) topk_kernel<float>(teacher_logp, K, out);
  else topk_kernel<double>(teacher_logp, K, out);
  return out;
}

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
