// CPU global gradient norm (deterministic chunked f64 sum) and torch-style clipping.
#include "opdlm/ops/grad_norm.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace opdlm::ops {

namespace {

// Fixed chunking keeps the summation order independent of the thread count (and of ZeRO-1 shards).
constexpr int64_t kChunk = kGradNormChunk;

void check_grad(const Tensor* t, size_t i, const char* op) {
  const std::string name = "grads[" + std::to_string(i) + "]";
  if (!t) OPDLM_FAIL(op, ": '", name, "' is a null pointer");
  expect_float_cpu(*t, name.c_str());
}

template <class T>
double sq_sum(const Tensor& t) {
  const T* p = t.data<T>();
  const int64_t N = t.numel(), nchunks = (N + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(nchunks));
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t e = std::min(N, (c + 1) * kChunk);
    part[static_cast<size_t>(c)] = chunk_sq_sum(p + c * kChunk, e - c * kChunk);
  }
  double s = 0.0;
  for (double x : part) s += x;
  return s;
}

template <class T>
void scale(Tensor& t, double f) {
  T* p = t.data<T>();
  const int64_t N = t.numel();
#pragma omp parallel for simd schedule(static) if (N > kChunk)
  for (int64_t i = 0; i < N; ++i) p[i] = static_cast<T>(static_cast<double>(p[i]) * f);
}

}  // namespace

double chunk_sq_sum(const float* p, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  return s;
}

double chunk_sq_sum(const double* p, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += p[i] * p[i];
  return s;
}

double grad_sq_sum(const std::vector<const Tensor*>& grads) {
  for (size_t i = 0; i < grads.size(); ++i) check_grad(grads[i], i, "grad_sq_sum");
  double s = 0.0;
  for (const Tensor* t : grads) s += t->dtype() == DType::f32 ? sq_sum<float>(*t) : sq_sum<double>(*t);
  return s;
}

double global_grad_norm(const std::vector<const Tensor*>& grads) { return std::sqrt(grad_sq_sum(grads)); }

double clip_coefficient(double norm, double max_norm) {
  if (!std::isfinite(norm)) return 1.0;
  const double c = max_norm / (norm + 1e-6);
  return c < 1.0 ? c : 1.0;
}

void scale_grads(const std::vector<Tensor*>& grads, double f) {
  for (size_t i = 0; i < grads.size(); ++i) check_grad(grads[i], i, "scale_grads");
  for (Tensor* t : grads) {
    if (t->dtype() == DType::f32) scale<float>(*t, f);
    else scale<double>(*t, f);
  }
}

double clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm) {
  if (!(std::isfinite(max_norm) && max_norm > 0.0))
    OPDLM_FAIL("clip_grad_norm: 'max_norm' is ", max_norm, ", must be finite and > 0");
  const double norm = global_grad_norm(std::vector<const Tensor*>(grads.begin(), grads.end()));
  const double c = clip_coefficient(norm, max_norm);
  if (c < 1.0) scale_grads(grads, c);
  return norm;
}

}  // namespace opdlm::ops
