// CPU SwiGLU (silu(gate) * up) forward/backward, elementwise with OpenMP; f32 vectorised (AVX2).
#include "opdlm/ops/swiglu.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "simd_avx2.hpp"

namespace opdlm::ops {
namespace {

void check_pair(const Tensor& gate, const Tensor& up) {
  expect_float_cpu(gate, "gate");
  expect_float_cpu(up, "up");
  expect_ndim(gate, "gate", 2);
  expect_same_dtype(gate, "gate", up, "up");
  expect_shape(up, "up", gate.shape(), "shape of 'gate'");
}

// sigmoid written so that exp never overflows for large |g|.
template <class T>
inline T sigmoid(T g) {
  if (g >= 0) return T(1) / (T(1) + std::exp(-g));
  const T e = std::exp(g);
  return e / (T(1) + e);
}

#ifdef OPDLM_SIMD_X86
// The same sigmoid 8 lanes at a time: e = exp(-|g|) <= 1 never overflows. libm's expf was 10 % of a
// tiny-model training step, called once per element here and in the backward.
OPDLM_AVX2 inline __m256 sigmoid256(__m256 g) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = simd::exp256(_mm256_or_ps(g, sign));  // exp(-|g|)
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 nonneg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, nonneg);
}

constexpr int64_t kChunk = 1 << 12;  // elements per OpenMP work item

OPDLM_AVX2 void forward_chunk(const float* g, const float* u, float* h, int64_t i, int64_t e) {
  for (; i + 8 <= e; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid256(gv)), _mm256_loadu_ps(u + i)));
  }
  if (i < e) {
    const __m256i m = simd::lanes(e - i);
    const __m256 gv = _mm256_maskload_ps(g + i, m);
    _mm256_maskstore_ps(h + i, m, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid256(gv)), _mm256_maskload_ps(u + i, m)));
  }
}

// The OpenMP loops stay outside the target("avx2") functions: clang outlines a parallel region
// without its function's target features.
void forward_avx2(const float* g, const float* u, float* h, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t c = 0; c < n; c += kChunk) forward_chunk(g, u, h, c, std::min(n, c + kChunk));
}

// dg, du may alias the inputs: every lane is loaded before it is stored.
OPDLM_AVX2 void backward_chunk(const float* g, const float* u, const float* dh, float* dg, float* du, int64_t c,
                               int64_t e) {
  for (int64_t i = c; i < e; i += 8) {
    const __m256i m = simd::lanes(std::min<int64_t>(8, e - i));
    const __m256 gv = _mm256_maskload_ps(g + i, m), uv = _mm256_maskload_ps(u + i, m);
    const __m256 d = _mm256_maskload_ps(dh + i, m), sv = sigmoid256(gv);
    const __m256 one_minus = _mm256_sub_ps(_mm256_set1_ps(1.0f), sv);
    if (dg)  // d * u * (s + g * s * (1 - s))
      _mm256_maskstore_ps(dg + i, m,
                          _mm256_mul_ps(_mm256_mul_ps(d, uv), _mm256_add_ps(sv, _mm256_mul_ps(_mm256_mul_ps(gv, sv), one_minus))));
    if (du) _mm256_maskstore_ps(du + i, m, _mm256_mul_ps(_mm256_mul_ps(d, gv), sv));
  }
}

void backward_avx2(const float* g, const float* u, const float* dh, float* dg, float* du, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t c = 0; c < n; c += kChunk) backward_chunk(g, u, dh, dg, du, c, std::min(n, c + kChunk));
}
#endif

template <class T>
void forward(const T* g, const T* u, T* h, int64_t n) {
#ifdef OPDLM_SIMD_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd::cpu_has_avx2_fma()) return forward_avx2(g, u, h, n);
#endif
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

// silu'(g) = s + g s (1 - s), s = sigmoid(g).
template <class T>
void backward(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
#ifdef OPDLM_SIMD_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd::cpu_has_avx2_fma()) return backward_avx2(g, u, dh, dg, du, n);
#endif
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(g[i]);
    const T gi = g[i], ui = u[i], d = dh[i];  // read first: dg/du may alias the inputs
    if (dg) dg[i] = d * ui * (s + gi * s * (T(1) - s));
    if (du) du[i] = d * gi * s;
  }
}

}  // namespace

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  check_pair(gate, up);
  Tensor h = Tensor::empty(gate.shape(), gate.dtype());
  if (gate.dtype() == DType::f32) forward(gate.data<float>(), up.data<float>(), h.data<float>(), h.numel());
  else forward(gate.data<double>(), up.data<double>(), h.data<double>(), h.numel());
  return h;
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor* dgate, Tensor* dup) {
  check_pair(gate, up);
  expect_float_cpu(dh, "dh");
  expect_same_dtype(gate, "gate", dh, "dh");
  expect_shape(dh, "dh", gate.shape(), "shape of 'gate'");
  if (dgate) prepare_output(*dgate, "dgate", gate.shape(), gate.dtype());
  if (dup) prepare_output(*dup, "dup", gate.shape(), gate.dtype());
  const int64_t n = gate.numel();
  if (gate.dtype() == DType::f32)
    backward(gate.data<float>(), up.data<float>(), dh.data<float>(), dgate ? dgate->data<float>() : nullptr,
             dup ? dup->data<float>() : nullptr, n);
  else
    backward(gate.data<double>(), up.data<double>(), dh.data<double>(), dgate ? dgate->data<double>() : nullptr,
             dup ? dup->data<double>() : nullptr, n);
}

}  // namespace opdlm::ops
