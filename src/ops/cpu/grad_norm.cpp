// CPU global gradient norm (deterministic chunked f64 sum) and torch-style clipping.
#include "opdlm/ops/grad_norm.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
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

// ---- exact sum of squares --------------------------------------------------------------------------

namespace opdlm::ops {

namespace {
constexpr int kLsbExponent = -320;  // lane 0's lowest bit is 2^-320 (every f32 square is a multiple of 2^-298)
constexpr int64_t kDigitMask = (int64_t{1} << 32) - 1;
}  // namespace

void ExactSquareSum::add(float x) {
  if (std::isnan(x)) {
    ++lane_[kDigits];
    return;
  }
  if (std::isinf(x)) {
    ++lane_[kDigits + 1];
    return;
  }
  if (x == 0) return;
  const double s = double(x) * double(x);  // exact: 48 significant bits at most
  int e = 0;
  const double f = std::frexp(s, &e);                   // s = f 2^e, f in [0.5, 1)
  auto m = static_cast<uint64_t>(std::ldexp(f, 53));    // s = m 2^(e - 53), m < 2^53
  int shift = e - 53 - kLsbExponent;                    // m's lowest bit, counted from 2^-320
  if (shift < 0) m >>= -shift, shift = 0;               // drops zero bits only (s is on the 2^-298 grid)
  const unsigned __int128 v = static_cast<unsigned __int128>(m) << (shift % 32);
  const int lane = shift / 32;
  for (int k = 0; k < 3; ++k) lane_[size_t(lane + k)] += static_cast<int64_t>((v >> (32 * k)) & uint64_t(kDigitMask));
  if (++pending_ >= (int64_t{1} << 30)) normalize();  // a digit lane takes < 2^32 per add: no int64 overflow
}

void ExactSquareSum::add(std::span<const float> xs) {
  for (float x : xs) add(x);
}

void ExactSquareSum::normalize() {
  for (int i = 0; i + 1 < kDigits; ++i) {
    lane_[size_t(i + 1)] += lane_[size_t(i)] >> 32;
    lane_[size_t(i)] &= kDigitMask;
  }
  pending_ = 0;
}

std::array<int64_t, ExactSquareSum::kLanes> ExactSquareSum::lanes() {
  normalize();
  return lane_;
}

double ExactSquareSum::value(std::array<int64_t, kLanes> l) {
  if (l[kDigits] > 0) return std::numeric_limits<double>::quiet_NaN();
  if (l[kDigits + 1] > 0) return std::numeric_limits<double>::infinity();
  for (int i = 0; i + 1 < kDigits; ++i) {  // canonical digits: the rounding below sees one representation
    l[size_t(i + 1)] += l[size_t(i)] >> 32;
    l[size_t(i)] &= kDigitMask;
  }
  double r = 0;
  for (int i = kDigits - 1; i >= 0; --i) r += std::ldexp(double(l[size_t(i)]), 32 * i + kLsbExponent);
  return r;
}

}  // namespace opdlm::ops
