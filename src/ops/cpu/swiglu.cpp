// CPU SwiGLU (silu(gate) * up) forward/backward, elementwise with OpenMP.
#include "opdlm/ops/swiglu.hpp"

#include <cmath>

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

template <class T>
void forward(const T* g, const T* u, T* h, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

// silu'(g) = s + g s (1 - s), s = sigmoid(g).
template <class T>
void backward(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
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
