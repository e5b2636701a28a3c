// CPU softmax cross-entropy with per-row weights and ignore_index; OpenMP over rows.
#include "opdlm/ops/cross_entropy.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "opdlm/ops/softmax.hpp"
#include "simd_avx2.hpp"

namespace opdlm::ops {

namespace {

// Validates everything up front: exceptions must not escape the OpenMP regions below.
void check_inputs(const char* op, const Tensor& logits, const Tensor& targets, const Tensor& weight,
                  int32_t ignore_index) {
  expect_float_cpu(logits, "logits");
  expect_ndim(logits, "logits", 2);
  const int64_t n = logits.size(0), V = logits.size(1);
  if (V < 1) OPDLM_FAIL(op, ": tensor 'logits' ", logits.describe(), " dimension 1 (vocabulary) is 0, expected >= 1");
  expect_cpu(targets, "targets");
  expect_dtype(targets, "targets", {DType::i32});
  expect_ndim(targets, "targets", 1);
  expect_dim(targets, "targets", 0, n, "rows of 'logits'");
  if (weight.defined()) {
    expect_float_cpu(weight, "weight");
    expect_same_dtype(logits, "logits", weight, "weight");
    expect_shape(weight, "weight", {n}, "rows of 'logits'");
  }
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (t[i] != ignore_index && (t[i] < 0 || t[i] >= V))
      OPDLM_FAIL(op, ": tensor 'targets' row ", i, " has value ", t[i], ", outside [0, ", V,
                 ") (dimension 1 of 'logits') and not ignore_index ", ignore_index);
}

#ifdef OPDLM_SIMD_X86
// detail::row_logsumexp for f32, 8 lanes at a time (each lane's partial sum flushed to double every
// 256 terms, as there): the scalar expf calls of the forward and the backward were 10 % of a
// tiny-model training step.
OPDLM_AVX2 double row_logsumexp_avx2(const float* x, int64_t V) {
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + v));
  float mx = simd::hmax256(vm);
  for (; v < V; ++v) mx = std::max(mx, x[v]);
  if (mx == -std::numeric_limits<float>::infinity()) return -std::numeric_limits<double>::infinity();
  const __m256 vmx = _mm256_set1_ps(mx);
  double s = 0;
  for (int64_t v0 = 0; v0 < V; v0 += 2048) {
    const int64_t v1 = std::min<int64_t>(V, v0 + 2048);
    __m256 part = _mm256_setzero_ps();
    for (int64_t u = v0; u < v1; u += 8) {
      const __m256i m = simd::lanes(std::min<int64_t>(8, v1 - u));
      const __m256 e = simd::exp256(_mm256_sub_ps(_mm256_maskload_ps(x + u, m), vmx));
      part = _mm256_add_ps(part, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
    }
    s += static_cast<double>(simd::hsum256(part));
  }
  return static_cast<double>(mx) + std::log(s);
}

// row[v] = c * (exp(z[v] - e) - [v == t]) in f32.
OPDLM_AVX2 void backward_row_avx2(const float* z, int64_t V, float e, float c, int32_t t, float* row) {
  const __m256 ve = _mm256_set1_ps(e), vc = _mm256_set1_ps(c);
  for (int64_t v = 0; v < V; v += 8) {
    const __m256i m = simd::lanes(std::min<int64_t>(8, V - v));
    const __m256 p = simd::exp256(_mm256_sub_ps(_mm256_maskload_ps(z + v, m), ve));
    _mm256_maskstore_ps(row + v, m, _mm256_mul_ps(vc, p));
  }
  row[t] = static_cast<float>(static_cast<double>(c) * (static_cast<double>(std::exp(z[t] - e)) - 1.0));
}
#endif

// detail::row_logsumexp, vectorised for f32 where the CPU allows.
template <class T>
double row_lse(const T* x, int64_t V) {
#ifdef OPDLM_SIMD_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd::cpu_has_avx2_fma()) return row_logsumexp_avx2(x, V);
#endif
  return detail::row_logsumexp(x, V);
}

template <class T>
void forward_kernel(const Tensor& logits, const Tensor& targets, const Tensor& weight, Tensor& loss, Tensor& lse,
                    int32_t ignore_index) {
  const int64_t n = logits.size(0), V = logits.size(1);
  const T* z = logits.data<T>();
  const int32_t* t = targets.data<int32_t>();
  const T* w = weight.defined() ? weight.data<T>() : nullptr;
  T* pl = loss.data<T>();
  T* pe = lse.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    // Round lse to the storage dtype first so forward and backward see the same log-probs.
    const T e = static_cast<T>(row_lse(z + i * V, V));
    pe[i] = e;
    if (t[i] == ignore_index) {
      pl[i] = T(0);
      continue;
    }
    const double wi = w ? static_cast<double>(w[i]) : 1.0;
    pl[i] = static_cast<T>(wi * (static_cast<double>(e) - static_cast<double>(z[i * V + t[i]])));
  }
}

template <class T>
void backward_kernel(const Tensor& logits, const Tensor& targets, const Tensor& weight, const Tensor& lse,
                     const Tensor& dloss, Tensor& dz, int32_t ignore_index) {
  const int64_t n = logits.size(0), V = logits.size(1);
  const T* z = logits.data<T>();
  const int32_t* t = targets.data<int32_t>();
  const T* w = weight.defined() ? weight.data<T>() : nullptr;
  const T* pe = lse.data<T>();
  const T* pg = dloss.data<T>();
  T* pd = dz.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* row = pd + i * V;
    if (t[i] == ignore_index) {
      for (int64_t v = 0; v < V; ++v) row[v] = T(0);
      continue;
    }
    const double c = static_cast<double>(pg[i]) * (w ? static_cast<double>(w[i]) : 1.0);
    const T e = pe[i];
#ifdef OPDLM_SIMD_X86
    if constexpr (std::is_same_v<T, float>)
      if (simd::cpu_has_avx2_fma()) {
        backward_row_avx2(z + i * V, V, e, static_cast<float>(c), t[i], row);
        continue;
      }
#endif
    for (int64_t v = 0; v < V; ++v)
      row[v] = static_cast<T>(c * (static_cast<double>(std::exp(z[i * V + v] - e)) - (v == t[i] ? 1.0 : 0.0)));
  }
}

}  // namespace

Tensor cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& weight, Tensor* lse,
                             int32_t ignore_index) {
  check_inputs("cross_entropy_forward", logits, targets, weight, ignore_index);
  const int64_t n = logits.size(0);
  Tensor loss = Tensor::empty({n}, logits.dtype());
  Tensor e = Tensor::empty({n}, logits.dtype());
  if (logits.dtype() == DType::f32) forward_kernel<float>(logits, targets, weight, loss, e, ignore_index);
  else forward_kernel<double>(logits, targets, weight, loss, e, ignore_index);
  if (lse) *lse = e;
  return loss;
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& weight,
                              const Tensor& lse, const Tensor& dloss, int32_t ignore_index) {
  check_inputs("cross_entropy_backward", logits, targets, weight, ignore_index);
  const int64_t n = logits.size(0);
  expect_float_cpu(lse, "lse");
  expect_same_dtype(logits, "logits", lse, "lse");
  expect_shape(lse, "lse", {n}, "rows of 'logits'");
  expect_float_cpu(dloss, "dloss");
  expect_same_dtype(logits, "logits", dloss, "dloss");
  expect_shape(dloss, "dloss", {n}, "rows of 'logits'");
  Tensor dz = Tensor::empty(logits.shape(), logits.dtype());
  if (logits.dtype() == DType::f32) backward_kernel<float>(logits, targets, weight, lse, dloss, dz, ignore_index);
  else backward_kernel<double>(logits, targets, weight, lse, dloss, dz, ignore_index);
  return dz;
}

}  // namespace opdlm::ops
